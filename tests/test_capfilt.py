"""CapFilt: the filter drops a planted mismatched caption and keeps a true one, with precision and recall 1 on a
hand-made case (a filter that keeps everything fails that check); the synthetic captions' report against a hand
count; `fewshot data filter mode=capfilt` end to end with a tiny blip run: each web row's p(match) equals the
ITM head's on that pair alone, the bootstrapped manifest is exactly the kept web rows then the kept synthetic
captions, each synthetic caption judged by the verifier against its scene."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.data.capfilt import capfilt_result, synthetic_report
from fewshot.data.filters import filter_report
from fewshot.errors import DataError


@pytest.mark.parametrize("threshold", [0.5, 0.0], ids=["capfilt", "keeps everything (broken)"])
def test_the_filter_drops_a_planted_mismatched_caption_and_keeps_a_true_one(threshold):
    # rows: a true caption, a planted mismatched one, a near miss, another true one; the head's p(match) for each
    noise = ["", "mismatched", "near_miss", ""]
    match = np.array([0.93, 0.04, 0.31, 0.71])
    report = filter_report(noise, capfilt_result(match, threshold))
    good = report["capfilt"]["precision"] == 1.0 and report["capfilt"]["recall"] == 1.0 and report["all"]["dropped"] == 2
    assert good == (threshold == 0.5)
    kept = capfilt_result(match, threshold).kept
    assert (1 not in kept and 0 in kept) == (threshold == 0.5)


def test_the_synthetic_report_against_a_hand_count():
    true = [True, False, True, False, False]
    kept = np.array([True, False, False, True, False])
    r = synthetic_report(true, kept)
    assert (r["written"], r["kept"], r["true"], r["true_of_kept"]) == (5, 2, 0.4, 0.5)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)  # dropped {1, 2, 4}: 1 and 4 false
    with pytest.raises(DataError, match="finite"):
        capfilt_result(np.array([0.2, np.nan]))


def test_capfilt_through_the_filter_command(tmp_path: Path):
    from fewshot import api
    from fewshot.data.pairs import load_pairs, read_manifest
    from fewshot.data.scenes import NoiseConfig, caption_is_true, read_scenes, write_scenes

    write_scenes(tmp_path / "pool", 24, size=16, objects=(1, 2), seed=0, fewshot_per_shape=1,
                 noise=NoiseConfig(mismatched=0.3))
    manifest = tmp_path / "pool" / "manifest.tsv"
    corpus = tmp_path / "play.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 20)
    config = api.load_config(overrides=[
        "method=blip", "data.source=pairs", f"data.path={manifest}", f"data.corpus={corpus}", "data.vocab_size=300", "data.seq_len=24",
        "data.image_size=16", "encoder.name=conv4", "encoder.options={width: 8, pools: 2}", "method.dim=16", "method.depth=1",
        "method.heads=2", "method.embed_dim=8", "train.steps=3", "train.batch_size=8", f"out={tmp_path}", "name=blip",
        "train.channels_last=false"])
    run_dir = api.pretrain(config, progress=False).run_dir
    run = api.open_run(run_dir)
    method = run.method().eval()
    rows = read_manifest(manifest)
    pairs = load_pairs(manifest, run.tokenizer(), 24, 16)
    with torch.no_grad():
        alone = [float(method.match_probability(pairs.images[pairs.image_index[r : r + 1]].float() / 255, pairs.tokens[r : r + 1])[0])
                 for r in range(len(rows))]
    threshold = float(np.median(alone))
    summary = api.filter_pairs(manifest, tmp_path / "boot.tsv", ["mode=capfilt", f"blip_run={run_dir}", f"match_threshold={threshold}"])
    kept_web = [r for r in range(len(rows)) if alone[r] >= threshold]
    assert summary["kept_web"] == len(kept_web) and summary["report"]["capfilt"]["flagged"] == len(rows) - len(kept_web)
    boot = read_manifest(tmp_path / "boot.tsv")
    n = len(kept_web)
    assert boot.captions[:n] == [rows.captions[r] for r in kept_web]
    assert all(Path(p).is_absolute() for p in boot.filepaths)  # another folder: paths made absolute
    scenes = read_scenes(tmp_path / "pool")
    synthetic = list(zip(boot.filepaths[n:], boot.captions[n:], boot.noise[n:]))
    assert len(synthetic) == summary["synthetic"]["kept"] <= summary["synthetic"]["written"] == len(set(rows.filepaths))
    for path, caption, label in synthetic:
        truth = caption_is_true(caption, scenes[str(Path(path).relative_to((tmp_path / "pool").resolve()))])
        assert label == ("" if truth else "synthetic_false")
    with open(tmp_path / "boot.dropped.tsv", encoding="utf-8") as f:
        dropped = list(csv.DictReader(f, delimiter="\t"))
    assert sum(d["reason"] == "capfilt" for d in dropped) == len(rows) - n
    assert sum(d["reason"] == "capfilt_synthetic" for d in dropped) == summary["synthetic"]["written"] - summary["synthetic"]["kept"]
    with pytest.raises(DataError, match="keeps none"):
        api.filter_pairs(manifest, tmp_path / "none.tsv", ["mode=capfilt", f"blip_run={run_dir}", "match_threshold=1.01"])
    with pytest.raises(DataError, match="set blip_run"):
        api.filter_pairs(manifest, tmp_path / "x.tsv", ["mode=capfilt"])
