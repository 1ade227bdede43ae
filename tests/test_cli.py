"""The CLI end to end on tiny settings: JSON results, one-line errors, nothing overwritten."""

import json
import os
import subprocess
import sys

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
