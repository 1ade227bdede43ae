"""In-context regression: the closed-form learners a meta-trained model is compared with, and its curves.

Every baseline is a function ``(support_xs (B, k, d), support_ys (B, k), query (B, m, d)) -> (B, m)``
that fits each prompt's k pairs on its own and predicts its m queries; with k = 0 each predicts 0.
:func:`prefix_predictions` runs one along a prompt the way a causal model reads it: position i
is predicted from the i pairs before it. Errors are squared error ÷ d against k (Garg et al. 2022),
and two learners are compared by the squared difference of their predictions (Akyürek et al. 2022).

For x ~ N(0, I_d) and w ~ N(0, I_d), one gradient step from w = 0 on the mean squared error,
w₁ = (η/k) Σ_i y_i x_i, has expected error ÷ d
    E[(w₁·x − y)²]/d = η²(k + d + 1 + σ²)/k − 2η + 1 + σ²/d
(the second moment of a Wishart matrix, E[(XᵀX)²] = k(k + d + 1)I), least at
η* = k/(k + d + 1 + σ²), where it is (d + 1)/(k + d + 1) without noise. η = 1 is the
"averaging" estimator of Garg et al., with error (d + 1)/k.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from fewshot.data.tasks import RegressionDataConfig, regression_tasks
from fewshot.errors import ConfigError, DataError
from fewshot.io import atomic_write

Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(support_xs (B, k, d), support_ys (B, k), query (B, m, d)) → predictions (B, m)."""


def _checked(xs: torch.Tensor, ys: torch.Tensor, query: torch.Tensor) -> None:
    if xs.ndim != 3 or ys.shape != xs.shape[:2] or query.ndim != 3 or query.shape[0] != xs.shape[0] or query.shape[2] != xs.shape[2]:
        raise ValueError(
            f"expected support xs (B, k, d), ys (B, k) and query (B, m, d); got {tuple(xs.shape)}, {tuple(ys.shape)}, {tuple(query.shape)}"
        )


def _predict(w: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(B, d) weights at (B, m, d) queries → (B, m), in the query's dtype."""
    return torch.einsum("bmd,bd->bm", query.double(), w).to(query.dtype)


def zero(xs: torch.Tensor, ys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """ŷ = 0: the prior mean of w·x, error ÷ d = 1 (+ σ²/d)."""
    _checked(xs, ys, query)
    return query.new_zeros(query.shape[:2])


def least_squares(xs: torch.Tensor, ys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """ŵ = X⁺y, the minimum-norm least-squares fit (the interpolating one when k < d), in float64."""
    _checked(xs, ys, query)
    if xs.shape[1] == 0:
        return zero(xs, ys, query)
    w = torch.linalg.pinv(xs.double()) @ ys.double().unsqueeze(-1)  # (B, d, k) @ (B, k, 1)
    return _predict(w.squeeze(-1), query)


def ridge(lam: float) -> Predictor:
    """ŵ = (XᵀX + λI)⁻¹Xᵀy (no intercept); with λ = σ² and w ~ N(0, I) it is the posterior mean,
    the Bayes-optimal predictor under squared error."""
    if lam <= 0:
        raise ValueError(f"ridge needs λ > 0 (λ = 0 is least_squares), got {lam}")

    def predict(xs: torch.Tensor, ys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        _checked(xs, ys, query)
        x, y = xs.double(), ys.double().unsqueeze(-1)
        gram = x.transpose(1, 2) @ x + lam * torch.eye(x.shape[2], dtype=x.dtype, device=x.device)
        return _predict(torch.linalg.solve(gram, x.transpose(1, 2) @ y).squeeze(-1), query)

    return predict


def best_step(k: int, d: int, noise: float = 0.0) -> float:
    """η* = k/(k + d + 1 + σ²): the step of one gradient step from 0 with the least expected error."""
    return k / (k + d + 1 + noise**2)


def gradient_step_error(k: int, d: int, eta: float | None = None, noise: float = 0.0) -> float:
    """Expected squared error ÷ d of one gradient step from 0 with step η (η* when None), for
    x, w ~ N(0, I_d) and ε ~ N(0, σ²) in the k support targets and the query's:
    η²(k + d + 1 + σ²)/k − 2η + 1 + σ²/d."""
    if k < 1:
        return 1.0 + noise**2 / d
    eta = best_step(k, d, noise) if eta is None else eta
    return eta**2 * (k + d + 1 + noise**2) / k - 2 * eta + 1 + noise**2 / d


def gradient_step(eta: float | None = None, noise: float = 0.0) -> Predictor:
    """ŵ = (η/k) Σ_i y_i x_i: one gradient step from w = 0 on (1/2k) Σ_i (w·x_i − y_i)².

    η = 1 is "averaging"; None takes η* = k/(k + d + 1 + σ²) for each prompt length k."""

    def predict(xs: torch.Tensor, ys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        _checked(xs, ys, query)
        k, d = xs.shape[1], xs.shape[2]
        if k == 0:
            return zero(xs, ys, query)
        step = best_step(k, d, noise) if eta is None else eta
        return _predict(step / k * torch.einsum("bkd,bk->bd", xs.double(), ys.double()), query)

    return predict


def nearest_neighbors(n_neighbors: int = 3) -> Predictor:
    """ŷ = mean of the y of the min(k, n) support inputs nearest the query (Euclidean; Garg et al.'s
    3-NN with uniform weights; ties go to the earlier pair)."""
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be ≥ 1, got {n_neighbors}")

    def predict(xs: torch.Tensor, ys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        _checked(xs, ys, query)
        if xs.shape[1] == 0:
            return zero(xs, ys, query)
        dist = torch.cdist(query.double(), xs.double())  # (B, m, k)
        nearest = dist.topk(min(n_neighbors, xs.shape[1]), dim=-1, largest=False, sorted=True).indices
        picked = torch.gather(ys.double().unsqueeze(1).expand(-1, query.shape[1], -1), 2, nearest)
        return picked.mean(-1).to(query.dtype)

    return predict


def baselines(dim: int, noise: float = 0.0) -> dict[str, Predictor]:
    """The closed-form learners of the curves, by name: least squares, ridge with λ = σ² (when σ > 0),
    one gradient step at η*, averaging (η = 1), 3-NN and zero."""
    table: dict[str, Predictor] = {"least-squares": least_squares}
    if noise > 0:
        table["ridge"] = ridge(noise**2)
    table.update({"gd-step": gradient_step(None, noise), "averaging": gradient_step(1.0), "3-nn": nearest_neighbors(3), "zero": zero})
    return table


def prefix_predictions(predictor: Predictor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(B, n) predictions of y_i from the first i pairs, i = 0..n−1, as a causal model makes them.

    xs: (B, n, d), ys: (B, n)."""
    return torch.stack([predictor(xs[:, :i], ys[:, :i], xs[:, i : i + 1])[:, 0] for i in range(xs.shape[1])], dim=1)


def curve(values: torch.Tensor) -> list[dict[str, float]]:
    """Per position k (= in-context examples): the mean of ``values`` (B, n) over the B prompts ± 95% CI
    (1.96 · standard error)."""
    n_prompts = values.shape[0]
    mean = values.double().mean(0)
    sem = values.double().std(0, unbiased=True) / math.sqrt(n_prompts) if n_prompts > 1 else torch.zeros_like(mean)
    return [{"k": k, "mean": float(m), "ci95": float(1.96 * s)} for k, (m, s) in enumerate(zip(mean, sem))]


def squared_error(predictions: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(ŷ − y)² per prompt and position: predictions and ys (B, n) → (B, n), float64."""
    return (predictions.double() - ys.double()) ** 2


def error_curves(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    xs: torch.Tensor,
    ys: torch.Tensor,
    noise: float = 0.0,
    extra: dict[str, Predictor] | None = None,
) -> dict[str, object]:
    """Squared error ÷ d against k for the model (when given: ``model(xs, ys) -> (B, n)``, causal) and
    every baseline, and the squared prediction difference ÷ d between the model and each baseline.

    xs: (B, n, d), ys: (B, n). Returns ``{"error": {name: rows}, "difference": {baseline: rows}}``,
    each row ``{"k", "mean", "ci95"}``."""
    d = xs.shape[2]
    predictors = {**baselines(d, noise), **(extra or {})}
    predictions = {name: prefix_predictions(p, xs, ys) for name, p in predictors.items()}
    if model is not None:
        with torch.no_grad():
            predictions = {"model": model(xs, ys).detach(), **predictions}
    error = {name: curve(squared_error(p, ys) / d) for name, p in predictions.items()}
    difference = {} if model is None else {
        name: curve((predictions["model"].double() - p.double()) ** 2 / d) for name, p in predictions.items() if name != "model"
    }
    return {"error": error, "difference": difference}


def plot_error_curves(error: dict[str, list[dict[str, float]]], dim: int, path: str, title: str = "") -> str:
    """Squared error ÷ d against k with 95% CI bands, one line per learner, written to ``path`` (PNG)."""
    from fewshot.report import plt, save_figure  # matplotlib (Agg) only when a plot is drawn

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in error.items():
        k = [r["k"] for r in rows]
        mean = [r["mean"] for r in rows]
        ci = [r["ci95"] for r in rows]
        ax.plot(k, mean, label=name, lw=2.5 if name == "model" else 1.2)
        ax.fill_between(k, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)], alpha=0.2)
    ax.axvline(dim, color="grey", ls=":", lw=1)
    ax.set(xlabel="in-context examples k", ylabel="squared error / d", ylim=(0, 1.5), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def evaluate_prompt_model(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    data: RegressionDataConfig,
    prompts: int = 1000,
    seed: int = 0,
    points: int | None = None,
    fresh_tasks: bool = False,
    chunk: int = 250,
) -> dict[str, object]:
    """:func:`error_curves` on ``prompts`` evaluation prompts of ``data`` (seed ``seed``, never a training
    prompt), ``points`` long (default ``data.points``); the model runs ``chunk`` prompts at a time."""
    if prompts < 2:
        raise DataError(f"the 95% CI needs at least 2 prompts, got {prompts}")
    batch = regression_tasks(data, eval_seed=seed, points=points, fresh_tasks=fresh_tasks).prompts_for(prompts)
    xs, ys = batch["xs"], batch["ys"]
    chunked = None
    if model is not None:
        def chunked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([model(a[i : i + chunk], b[i : i + chunk]) for i in range(0, len(a), chunk)])
    out = error_curves(chunked, xs, ys, data.noise)
    return {"dim": data.dim, "points": xs.shape[1], "noise": data.noise, "prompts": prompts, "seed": seed,
            "fresh_tasks": fresh_tasks or data.task_pool is None, **out}


def evaluate_regression_run(
    path: str | Path, prompts: int = 1000, seed: int = 0, points: int | None = None, fresh_tasks: bool = False, plot: bool = True
) -> dict[str, object]:
    """``fewshot icl evaluate RUN``: the run's prompt model and the closed forms on the same seeded
    evaluation prompts; curves.json (and curves.png) in a new ``RUN/evaluations/icl-<time>/`` folder."""
    from fewshot.run import Run

    run = Run.open(path)
    if not isinstance(run.config.data, RegressionDataConfig):
        raise ConfigError(f"'{path}' is a {run.config.method.name} run on data.source={run.config.data.source}; "
                          f"fewshot icl evaluate needs a run on data.source=linear-regression")
    model = run.encoder()
    longest = getattr(model, "points", None)
    if points is not None and longest is not None and points > longest:
        raise DataError(f"a prompt of {points} points is {points - longest} longer than the model's context of {longest} points")
    out = evaluate_prompt_model(model, run.config.data, prompts, seed, points, fresh_tasks)
    out = {"run_dir": str(run.path), "step": run.step, "method": run.config.method.name, **out}
    folder = run.path / "evaluations" / f"icl-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')}"
    if plot:
        out["plot"] = plot_error_curves(out["error"], out["dim"], str(folder / "curves.png"), f"{run.path.name} (step {run.step})")
    out["report_path"] = str(folder / "curves.json")
    atomic_write(folder / "curves.json", lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
    return out


def curve_table(error: dict[str, list[dict[str, float]]]) -> str:
    """Squared error ÷ d (± 95% CI) as text: one row per k, one column per learner."""
    names = list(error)
    lines = ["k".rjust(3) + "".join(name.rjust(16) for name in names)]
    for i, row in enumerate(error[names[0]]):
        cells = [f"{error[name][i]['mean']:.3f} ± {error[name][i]['ci95']:.3f}" for name in names]
        lines.append(str(row["k"]).rjust(3) + "".join(c.rjust(16) for c in cells))
    return "\n".join(lines)


__all__ = [
    "Predictor", "baselines", "best_step", "curve", "curve_table", "error_curves", "evaluate_prompt_model", "evaluate_regression_run", "gradient_step", "gradient_step_error", "least_squares",
    "nearest_neighbors", "plot_error_curves", "prefix_predictions", "ridge", "squared_error", "zero",
]
