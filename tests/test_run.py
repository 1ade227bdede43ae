"""Run.open: one checkpoint read per command, the encoder alone for adapting, two runs open at once."""

import pytest
import torch

from fewshot import api
from fewshot.run import Run

IMAGE = ["data.image_size=16", "train.steps=3", "train.batch_size=32", "train.warmup_steps=1", "method=moco",
         "method.projection_hidden=16", "method.projection_dim=8", "method.queue_size=64",
         "encoder.options={width: 8, pools: 3, blocks: 3}", "train.checkpoint_every=2"]
TEXT = ["data.source=text", "data.seq_len=16", "data.vocab_size=300", "encoder=text-transformer", "method=gpt",
        "encoder.options={dim: 16, depth: 1, heads: 2}", "train.batch_size=4", "train.steps=2", "train.warmup_steps=1",
        "train.channels_last=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    corpus = out / "play.txt"
    corpus.write_text("".join(f"ROMEO:\nSpeech {i} of the young lover.\n\nJULIET:\nAnswer {i} from the balcony.\n\n" for i in range(40)))
    api.pretrain(api.load_config(overrides=[f"out={out}", "name=image", *IMAGE]), progress=False)
    api.pretrain(api.load_config(overrides=[f"out={out}", "name=text", f"data.path={corpus}", *TEXT]), progress=False)
    return out


def test_two_runs_open_at_once_each_with_its_own_parts(runs):
    image, text = Run.open(runs / "image"), Run.open(runs / "text" / "checkpoints" / "last.safetensors")
    assert (image.path, text.path) == (runs / "image", runs / "text")  # a checkpoint file opens its run folder
    assert image.tokenizer() is None and text.tokenizer().get_vocab_size() == 300
    assert image.config.method.name == "moco" and text.config.method.name == "gpt"
    assert image.base_sha256 == image.checkpoint.meta["tensors_sha256"] != text.base_sha256
    ids = torch.tensor([[1, 7, 9, 11]])
    assert text.encoder().embed(ids).shape == (1, 16)


def test_the_encoder_alone_equals_the_method_encoder(runs):
    run = Run.open(runs / "image")
    alone, method = run.encoder(), run.method()
    assert not hasattr(alone, "queue") and hasattr(method, "queue")  # no MoCo queue or target built for it
    full = method.encoder.eval().state_dict()
    assert alone.state_dict().keys() == full.keys()
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(tensor, full[name], rtol=0, atol=0)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(alone(x), method.encoder(x), rtol=0, atol=0)


def test_adapt_builds_only_the_encoder(runs, monkeypatch):
    import fewshot.run

    def no_method(config):
        raise AssertionError("the whole pre-training method was built")

    monkeypatch.setattr(fewshot.run, "build_method", no_method)
    row = api.adapt(runs / "image", "linear-probe", episodes=1, way=2, shot=1, query=1)
    assert row["episodes"] == 1
    with pytest.raises(AssertionError, match="whole pre-training method"):  # the control: load_pretrained does build it
        api.load_pretrained(runs / "image")


def test_resume_reads_the_checkpoint_once(runs, tmp_path, monkeypatch):
    import shutil

    import fewshot.io
    from fewshot.data.registry import load_run_data
    from fewshot.train import trainer

    reads = []
    real = fewshot.io.load_file
    monkeypatch.setattr(fewshot.io, "load_file", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    config = api.load_config(overrides=[f"out={tmp_path}", "name=image", *IMAGE])
    shutil.copytree(runs / "image", tmp_path / "image")
    assert api.pretrain(config, resume=True, progress=False).step == 3
    assert len(reads) == 1
    # The control: opening the run and letting the trainer read the checkpoint again is two reads.
    shutil.rmtree(tmp_path / "image")
    shutil.copytree(runs / "image", tmp_path / "image")
    reads.clear()
    data = load_run_data(Run.open(config.run_dir).config.data).pretrain
    trainer.pretrain(config, data, resume=True, progress=False)
    assert len(reads) == 2


def _as_before_the_trunk(run_dir, to):
    """A copy of ``run_dir`` whose checkpoint names the tower's weights as fewshot did before the shared
    token trunk (``encoder.blocks.0.…``, ``encoder.norm.…``, not ``encoder.trunk.…``)."""
    import shutil

    from fewshot.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    shutil.copytree(run_dir, to)
    path = to / "checkpoints" / "last.safetensors"
    ckpt = load_checkpoint(path)
    assert any(".trunk.blocks.0." in k for k in ckpt.tensors)
    path.unlink(), path.with_suffix(".json").unlink()
    save_checkpoint(path, Checkpoint(ckpt.config, ckpt.step, {k.replace("trunk.", ""): v for k, v in ckpt.tensors.items()},
                                     {k: v for k, v in ckpt.meta.items() if k in ("history", "train_seconds", "optimizer")}))
    return to


def test_a_checkpoint_from_before_the_token_trunk_names_the_cause_in_one_line(runs, tmp_path):
    from fewshot.errors import CheckpointError

    old = _as_before_the_trunk(runs / "text", tmp_path / "text")
    config = api.load_config(overrides=[f"out={tmp_path}", "name=text", *TEXT])
    for load in (lambda: Run.open(old).encoder(), lambda: Run.open(old).method(), lambda: api.pretrain(config, resume=True, progress=False)):
        with pytest.raises(CheckpointError, match=r"older fewshot version \('(encoder\.)?blocks\.0\.\S+' is now '(encoder\.)?trunk\.blocks\.0\.") as err:
            load()
        assert "\n" not in str(err.value) and "retrain" in str(err.value)


def test_old_vit_names_and_other_mismatches_get_their_own_messages():
    """A hand-made ViT state dict with one weight under its old name says "older fewshot version"; a
    state dict with an unrelated unknown name (the negative control) gets the plain mismatch message."""
    from fewshot.errors import CheckpointError
    from fewshot.models.encoders import create_encoder
    from fewshot.train.checkpoint import load_weights

    vit = create_encoder("vit-tiny", image_size=16, patch_size=8, depth=1)
    state = vit.state_dict()
    load_weights(vit, state, "checkpoint 'x'", "encoder")  # the current names load
    old = dict(state)
    old["norm.weight"] = old.pop("trunk.norm.weight")
    with pytest.raises(CheckpointError, match=r"older fewshot version \('norm\.weight' is now 'trunk\.norm\.weight'"):
        load_weights(vit, old, "checkpoint 'x'", "encoder")
    other = dict(state)
    other["head.weight"] = other.pop("trunk.norm.weight")
    with pytest.raises(CheckpointError, match="does not fit the encoder") as err:
        load_weights(vit, other, "checkpoint 'x'", "encoder")
    assert "older fewshot" not in str(err.value)
