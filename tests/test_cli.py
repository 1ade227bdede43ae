"""The CLI end to end on tiny settings: JSON results, one-line errors, nothing overwritten."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.cli import main

TINY = ["data.image_size=16", "train.steps=4", "train.batch_size=32", "train.log_every=1", "train.warmup_steps=1",
        "method.projection_hidden=32", "method.projection_dim=16", "encoder.options={width: 8}",
        "eval.episodes=20", "eval.queries=5", "eval.probe_fractions=[0.5,1.0]"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, needle):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("fewshot: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_info_json(capsys):
    code, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and "simclr" in info["methods"] and "conv4" in info["encoders"] and "characters" in info["views"]


def test_quickstart_json_has_the_table_and_files(capsys, tmp_path):
    code, out, _ = run(capsys, "quickstart", "--json", f"out={tmp_path}", *TINY)
    assert code == 0
    res = json.loads(out)
    encoders = {r["encoder"] for r in res["results"]}
    assert encoders == {"pixels", "random", "pretrained"}
    for row in res["results"]:
        assert set(row) >= {"encoder", "classifier", "way", "shot", "accuracy", "ci95"}
        assert 0 <= row["accuracy"] <= 1 and row["ci95"] >= 0
    assert {(r["way"], r["shot"]) for r in res["results"]} == {(5, 1), (5, 5)}
    run_dir = tmp_path / "quickstart"
    assert res["run_dir"] == str(run_dir)
    for name in ["report.md", "loss.png", "accuracy_vs_shots.png", "config.json"]:
        assert (run_dir / name).is_file(), name
    assert "5-way 1-shot" in (run_dir / "report.md").read_text()


def test_pretrain_then_evaluate(capsys, tmp_path):
    code, out, _ = run(capsys, "pretrain", "simclr-digits", "--json", f"out={tmp_path}", "name=r", *TINY)
    assert code == 0, out
    res = json.loads(out)
    assert res["step"] == 4 and res["run_dir"] == str(tmp_path / "r")
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "r"), "--json", "eval.shots=[1]", "eval.baselines=false")
    assert code == 0
    res = json.loads(out)
    assert {r["encoder"] for r in res["results"]} == {"pretrained"}
    # resume past the end continues with more steps only if asked; the same run again is refused
    code, _, err = run(capsys, "pretrain", "simclr-digits", f"out={tmp_path}", "name=r", *TINY)
    one_line_error(code, err, "--resume")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["pretrain", "train.stpes=3"], "unknown config key 'train.stpes'"),
        (["pretrain", "method=mystery"], "unknown method 'mystery'"),
        (["pretrain", "encoder=alexnet"], "unknown encoder 'alexnet'"),
        (["pretrain", "views=blurry"], "blurry"),
        (["pretrain", "train.lr=-1"], "train.lr"),
        (["pretrain", "no-such-recipe.yaml"], "no-such-recipe"),
        (["evaluate", "/nonexistent/run"], "not a fewshot checkpoint"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, args, needle):
    argv = [*args, f"out={tmp_path}", *TINY] if args[0] == "pretrain" else args
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, needle)


def test_way_larger_than_classes(capsys, tmp_path):
    code, _, err = run(capsys, "quickstart", f"out={tmp_path}", *TINY, "eval.ways=[8]")
    one_line_error(code, err, "8-way needs 8 classes")


def test_shots_plus_queries_larger_than_class(capsys, tmp_path):
    code, _, err = run(capsys, "quickstart", f"out={tmp_path}", *TINY, "eval.shots=[150]", "eval.queries=50")
    one_line_error(code, err, "needs 200 per class")


def _folder(root, corrupt=False):
    rng = np.random.default_rng(0)
    for c in ["a", "b"]:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(root / c / f"{i}.png")
    if corrupt:
        (root / "b" / "broken.png").write_bytes(b"not a png")


def test_data_info_folder_and_corrupt_image(capsys, tmp_path):
    _folder(tmp_path / "ok")
    code, out, _ = run(capsys, "data", "info", "folder", "--path", str(tmp_path / "ok"), "--json")
    assert code == 0 and json.loads(out)["classes"] == 2
    _folder(tmp_path / "bad", corrupt=True)
    code, _, err = run(capsys, "data", "info", "folder", "--path", str(tmp_path / "bad"))
    one_line_error(code, err, "broken.png")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "data", "info", "folder", "--path", str(tmp_path / "empty"))
    one_line_error(code, err, "empty")


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fewshot.cli", "pretrain", "train.steps=zero"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "train.steps" in proc.stderr


def test_unlabeled_folder_pretraining_with_a_labeled_evaluation_folder(capsys, tmp_path):
    rng = np.random.default_rng(1)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(40):
        Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(flat / f"{i}.png")
    labeled = tmp_path / "labeled"
    for c in "abcde":
        (labeled / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(labeled / c / f"{i}.png")
    common = ["data.source=unlabeled", f"data.path={flat}", f"eval.data_path={labeled}", "eval.queries=2",
              "eval.probe_fractions=[]", "train.batch_size=16"]
    code, out, err = run(capsys, "quickstart", "--json", f"out={tmp_path}", *TINY, *common, "eval.shots=[1]")
    assert code == 0, err
    res = json.loads(out)
    assert {r["way"] for r in res["results"]} == {5} and len(res["results"]) == 3 * 4
    # without any evaluation data there is nothing to score: one line, not a crash
    code, _, err = run(capsys, "evaluate", str(tmp_path / "quickstart"), "eval.data_path=null")
    one_line_error(code, err, "nothing to evaluate on")


def test_resume_refuses_changes_to_the_run(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "--resume", str(tmp_path / "r"), "train.lr=0.5")
    one_line_error(code, err, "only train.max_minutes")


def test_evaluate_never_overwrites_a_report(capsys, tmp_path):
    code, _, _ = run(capsys, "quickstart", f"out={tmp_path}", *TINY, "eval.shots=[1]")
    first = (tmp_path / "quickstart" / "report.md").read_text()
    paths = []
    for _ in range(2):
        code, out, _ = run(capsys, "evaluate", str(tmp_path / "quickstart"), "--json", "eval.shots=[1]")
        assert code == 0
        paths.append(json.loads(out)["report_path"])
    assert paths[0] != paths[1] and all(os.path.isfile(p) for p in paths)
    assert (tmp_path / "quickstart" / "report.md").read_text() == first


# ------------------------------------------------------------------ nothing overwritten
# Each test runs twice: with the guard, and with the guard switched off ("disabled"), where the same
# assertions must see the overwrite; the second run is the negative control that shows the check can fail.

ADAPT_TINY = ["data.image_size=16", "train.steps=2", "train.batch_size=32", "train.warmup_steps=1", "method.projection_hidden=16",
              "method.projection_dim=8", "encoder.options={width: 8, pools: 3, blocks: 3}", "method.projection_conv_blocks=0"]


@pytest.fixture(scope="module")
def adapt_run(tmp_path_factory):
    """A tiny finished run and a two-class support folder: (run folder, support folder)."""
    root = tmp_path_factory.mktemp("adapt")
    assert main(["pretrain", "--json", f"out={root}", "name=r", *ADAPT_TINY]) == 0
    _folder(root / "support")
    return root / "r", root / "support"


def _snapshot(folder):
    """Every file under ``folder``: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _disable_adapter_guard(monkeypatch):
    from fewshot.adapt import bases, files

    unguarded = lambda path, overwrite=False: Path(path).with_suffix(".safetensors")  # noqa: E731
    monkeypatch.setattr(files, "adapter_target", unguarded)
    monkeypatch.setattr(bases, "adapter_target", unguarded)


def _adapt(capsys, run_dir, support, out, *extra, method="ia3"):
    return run(capsys, "adapt", str(run_dir), "--method", method, "--support", str(support), "--steps", "1", "--out", str(out), *extra)


@pytest.mark.parametrize("guard", ["on", "disabled"])
def test_adapt_out_refuses_an_existing_adapter_unless_force(capsys, tmp_path, adapt_run, monkeypatch, guard):
    run_dir, support = adapt_run
    assert _adapt(capsys, run_dir, support, tmp_path / "task")[0] == 0
    before = _snapshot(tmp_path)
    if guard == "disabled":
        _disable_adapter_guard(monkeypatch)
    code, _, err = _adapt(capsys, run_dir, support, tmp_path / "task", method="lora")  # a different adapter, same name
    if guard == "disabled":  # the broken variant replaces the earlier adapter, and the comparison sees it
        assert code == 0 and _snapshot(tmp_path) != before
        return
    one_line_error(code, err, "already exists")
    assert "--force" in err and _snapshot(tmp_path) == before
    code, _, err = _adapt(capsys, run_dir, support, tmp_path / "task", "--force", method="lora")
    assert code == 0, err
    assert json.loads((tmp_path / "task.json").read_text())["method"] == "lora"  # --force replaced the earlier adapter


@pytest.mark.parametrize("guard", ["on", "disabled"])
@pytest.mark.parametrize("target", ["checkpoints/last", "checkpoints/new-task", "config"])
def test_adapt_never_writes_into_a_run_even_with_force(capsys, tmp_path, adapt_run, monkeypatch, guard, target):
    """``--out RUN/checkpoints/last`` would replace the run's checkpoint pair; ``--out RUN/config`` its config.json."""
    import shutil

    run_dir = tmp_path / "r"
    shutil.copytree(adapt_run[0], run_dir)
    before = _snapshot(run_dir)
    if guard == "disabled":
        _disable_adapter_guard(monkeypatch)
    code, _, err = _adapt(capsys, run_dir, adapt_run[1], run_dir / target, "--force")
    if guard == "disabled":
        assert code == 0 and _snapshot(run_dir) != before
        return
    one_line_error(code, err, "checkpoint folder" if target.startswith("checkpoints") else "not a fewshot adapter file")
    assert _snapshot(run_dir) == before  # not a byte changed, nothing added


@pytest.mark.parametrize("guard", ["on", "disabled"])
@pytest.mark.parametrize("present", [["config.json"], ["tokenizer.json"], ["config.json", "tokenizer.json"]])
def test_pretrain_refuses_a_folder_with_a_run_that_has_no_checkpoint(capsys, tmp_path, monkeypatch, guard, present):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    for name in present:
        (run_dir / name).write_text('{"an earlier run": true}')
    before = _snapshot(run_dir)
    if guard == "disabled":
        from fewshot import api

        monkeypatch.setattr(api, "refuse_existing_run", lambda run_dir: None)
    code, _, err = run(capsys, "pretrain", "simclr-digits", f"out={tmp_path}", "name=r", *TINY)
    if guard == "disabled":  # the broken variant trains into the folder; config.json is overwritten
        assert code == 0 and _snapshot(run_dir) != before
        return
    one_line_error(code, err, " and ".join(present))
    assert _snapshot(run_dir) == before
