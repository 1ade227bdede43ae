import json

import pytest
import torch

from fewshot.errors import CheckpointError
from fewshot.train.checkpoint import Checkpoint, load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint


def _ckpt():
    return Checkpoint({"name": "x"}, 3, {"model.w": torch.randn(3, 2), "rng.views": torch.Generator().get_state()}, {"history": [1]})


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "c", _ckpt())
    back = load_checkpoint(path)
    assert back.step == 3 and back.config == {"name": "x"} and back.meta["history"] == [1]
    assert set(back.tensors) == {"model.w", "rng.views"}
    assert back.meta["versions"]["torch"] == torch.__version__
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_tensors_survive_exactly(tmp_path):
    ck = _ckpt()
    back = load_checkpoint(save_checkpoint(tmp_path / "c", ck))
    assert torch.equal(back.tensors["model.w"], ck.tensors["model.w"])
    assert back.prefixed("model").keys() == {"w"}


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    tensors, scalars = optimizer_to_flat(opt.state_dict())
    json.dumps(scalars)  # the non-tensor part must be JSON
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.5)
    opt2.load_state_dict(optimizer_from_flat({k[len("optim."):]: v for k, v in tensors.items()}, scalars))
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state_dict()["state"][0][k]))
    assert opt2.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("damage", ["json", "format", "tensors", "missing"])
def test_not_a_checkpoint_is_rejected(tmp_path, damage):
    path = save_checkpoint(tmp_path / "c", _ckpt())
    meta = path.with_suffix(".json")
    if damage == "json":
        meta.write_text("{not json")
    elif damage == "format":
        meta.write_text(json.dumps({"step": 1}))
    elif damage == "tensors":
        path.write_bytes(path.read_bytes()[:-8] + b"garbage!")
    else:
        meta.unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_random_file_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a fewshot checkpoint"):
        load_checkpoint(bogus)
