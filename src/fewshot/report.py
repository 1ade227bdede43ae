"""Tables and plots of a run: the terminal table, report.md, the loss curve and accuracy vs shots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.pyplot as plt  # noqa: E402

from fewshot.io import atomic_write  # noqa: E402


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (a reader never sees half a file) and close it."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_table(results: list[dict[str, Any]], classifier: str | None = None) -> str:
    """Markdown table: one row per encoder × classifier, one column per (way, shot), cells 'acc ± ci' in %."""
    rows = [r for r in results if classifier is None or r["classifier"] == classifier]
    settings = sorted({(r["way"], r["shot"]) for r in rows})
    keys = list(dict.fromkeys((r["encoder"], r["classifier"]) for r in rows))
    cell = {(r["encoder"], r["classifier"], r["way"], r["shot"]): r for r in rows}
    head = "| encoder | classifier | " + " | ".join(f"{w}-way {s}-shot" for w, s in settings) + " |"
    lines = [head, "|" + "---|" * (2 + len(settings))]
    for enc, clf in keys:
        cells = []
        for w, s in settings:
            r = cell.get((enc, clf, w, s))
            cells.append(f"{_pct(r['accuracy'])} ± {_pct(r['ci95'])}" if r else "")
        lines.append(f"| {enc} | {clf} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lake_table(lake_runs: dict[str, dict[str, Any]]) -> str:
    lines = ["| encoder | Lake's 20 runs, 20-way 1-shot (%) |", "|---|---|"]
    lines += [f"| {enc} | {_pct(v['accuracy'])} |" for enc, v in lake_runs.items()]
    return "\n".join(lines)


def probe_table(probe: list[dict[str, Any]]) -> str:
    fractions = sorted({r["fraction"] for r in probe})
    encoders = list(dict.fromkeys(r["encoder"] for r in probe))
    cell = {(r["encoder"], r["fraction"]): r for r in probe}
    lines = ["| encoder | " + " | ".join(f"{100 * f:g}% labels" for f in fractions) + " |", "|" + "---|" * (1 + len(fractions))]
    for enc in encoders:
        lines.append(f"| {enc} | " + " | ".join(_pct(cell[(enc, f)]["accuracy"]) if (enc, f) in cell else "" for f in fractions) + " |")
    return "\n".join(lines)


def plot_loss(history: list[dict[str, float]], path: Path) -> Path | None:
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("pre-training loss")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_accuracy_vs_shots(results: list[dict[str, Any]], path: Path, classifier: str = "proto-cosine") -> Path | None:
    rows = [r for r in results if r["classifier"] == classifier]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for (enc, way) in dict.fromkeys((r["encoder"], r["way"]) for r in rows):
        pts = sorted((r["shot"], r["accuracy"], r["ci95"]) for r in rows if r["encoder"] == enc and r["way"] == way)
        shots, acc, ci = zip(*pts)
        ax.errorbar(shots, [100 * a for a in acc], yerr=[100 * c for c in ci], marker="o", capsize=3, label=f"{enc} ({way}-way)")
    ax.set_xticks(sorted({r["shot"] for r in rows}))
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"few-shot accuracy, {classifier}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(run_dir: Path, report: Any, history: list[dict[str, float]], header: str = "") -> Path:
    """report.md plus loss.png and accuracy_vs_shots.png in ``run_dir``; returns the report path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# fewshot report: {run_dir.name}", header]
    if report.results:
        parts += ["## Few-shot episodes (accuracy % ± 95% CI)", results_table(report.results)]
    if report.lake_runs:
        parts += ["## Lake et al. (2015) one-shot runs", lake_table(report.lake_runs)]
    if report.probe:
        parts += ["## Linear probe with a fraction of the labels (accuracy %)", probe_table(report.probe)]
    if plot_loss(history, run_dir / "loss.png"):
        parts.append("![loss](loss.png)")
    if plot_accuracy_vs_shots(report.results, run_dir / "accuracy_vs_shots.png"):
        parts.append("![accuracy vs shots](accuracy_vs_shots.png)")
    path = run_dir / "report.md"
    path.write_text("\n\n".join(p for p in parts if p) + "\n")
    return path
