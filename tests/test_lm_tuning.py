"""Answer tuning (`fewshot icl tune-lm`): LoRA on the text after each line's answer marker, merged, saved as a Hugging
Face folder. The model is a tiny random 2-layer GPT-2 (conftest), never SmolLM2."""

import json
from types import SimpleNamespace

import pytest
import torch

from fewshot.adapt.lm_tuning import answer_rows, save_hf_folder, tune_lm, tune_on_answers
from fewshot.cli import main
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.prompting import open_prompt_model

from conftest import save_tiny_hf_gpt2

pytest.importorskip("transformers")
pytest.importorskip("peft")

LINES = ["a red circle. this is a dax. q: what is this? a: this is a dax.",
         "a caption without the cue.",
         "a blue star. this is a wug. a red circle. this is a dax. q: what is this? a: this is a wug.",
         "q: what colour is the dax? a: red."]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), "\n".join(LINES * 3))


@pytest.fixture(scope="module")
def lm(hf_folder):
    return open_prompt_model(hf_folder)


def answer_nll(model, rows, shift: int = 0) -> float:
    """The mean −log p of the answer tokens, one unpadded row at a time (an independent loop; ``shift`` ≠ 0 misaligns
    the targets by that many positions, the negative control)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for context, answer in rows:
            ids = torch.tensor([context + answer])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            for j, token in enumerate(answer):
                position = len(context) - 1 + j + shift
                total -= logp[position, token].item()
                count += 1
    return total / count


def test_answer_rows_split_at_the_last_marker(lm):
    rows = answer_rows(lm, LINES)
    assert len(rows) == 3  # the caption has no "a:"
    context, answer = rows[0]
    assert context == list(lm.start_ids) + lm.encode("a red circle. this is a dax. q: what is this? a:")
    assert answer == lm.encode(" this is a dax.")
    assert rows[2][1] == lm.encode(" red.")
    assert answer_rows(lm, LINES, max_tokens=len(rows[0][0]) + len(rows[0][1])) == [rows[0], rows[2]]  # the long line left out


def test_the_loss_is_the_answer_tokens_cross_entropy(lm):
    rows = answer_rows(lm, LINES)
    logged = []
    # LoRA's B starts at 0, so the first step's loss is the base model's; a batch of every row in some order
    tune_on_answers(lm, rows, steps=1, batch_size=len(rows), log=lambda step, loss: logged.append(loss))
    # the mean over all answer tokens of the batch, as token_cross_entropy averages them
    assert logged[0] == pytest.approx(answer_nll(lm.model, rows), abs=1e-4)
    # negative control: targets one position late are a different loss
    assert abs(logged[0] - answer_nll(lm.model, rows, shift=1)) > 0.1


def test_tuning_raises_answer_likelihood_and_leaves_the_base_alone(lm):
    rows = answer_rows(lm, LINES)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    tuned = tune_on_answers(lm, rows, steps=30, lr=1e-2, batch_size=3, rank=4)
    assert answer_nll(tuned.model, rows) < answer_nll(lm.model, rows) - 1.0
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # the base is copied, never changed
    assert not any("lora" in name for name in tuned.model.state_dict())  # merged into plain weights
    assert set(tuned.model.state_dict()) == set(before)
    moved = {k for k, v in tuned.model.state_dict().items() if not torch.equal(before[k], v)}
    assert moved and all(".attn." in k for k in moved)  # only the attention projections carry LoRA


def test_saved_folder_reopens_to_the_same_logits(lm, tmp_path):
    tuned = tune_on_answers(lm, answer_rows(lm, LINES), steps=3, lr=1e-2, batch_size=2, rank=2)
    folder = save_hf_folder(tuned, tmp_path / "tuned", {"steps": 3})
    again = open_prompt_model(folder)
    ids = torch.tensor([list(lm.start_ids) + lm.encode(LINES[0])])
    with torch.no_grad():
        assert torch.allclose(again.model(input_ids=ids).logits, tuned.model(input_ids=ids).logits, atol=1e-5)
    assert json.loads((folder / "fewshot.json").read_text())["steps"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["tuned"]  # no temporary folder left
    with pytest.raises(ConfigError, match="exists"):
        save_hf_folder(tuned, folder, {})


def test_a_changed_weight_file_is_refused_at_load(lm, tmp_path):
    """The weights' SHA-256 recorded at save is checked at load; the untouched copy (the control) loads."""
    import shutil

    from fewshot.errors import CheckpointError

    folder = save_hf_folder(tune_on_answers(lm, answer_rows(lm, LINES), steps=1, rank=2), tmp_path / "tuned", {})
    shutil.copytree(folder, tmp_path / "copy")
    open_prompt_model(tmp_path / "copy")
    weights = tmp_path / "copy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="expected .*recorded in fewshot.json"):
        open_prompt_model(tmp_path / "copy")
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing.*recorded in fewshot.json"):
        open_prompt_model(tmp_path / "copy")


def test_bad_input(lm, tmp_path):
    with pytest.raises(DataError, match="marker"):
        tune_on_answers(lm, answer_rows(lm, ["no cue here"]), steps=1)
    with pytest.raises(ConfigError, match="Hugging Face"):
        tune_on_answers(SimpleNamespace(name="a fewshot gpt"), [([1], [2])], steps=1)
    with pytest.raises(DataError, match="not a file"):
        tune_lm("smollm2", tmp_path / "missing.txt", tmp_path / "out")


def test_cli(hf_folder, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    assert main(["icl", "tune-lm", str(hf_folder), "--corpus", str(corpus), "--out", str(tmp_path / "t"), "--steps", "2",
                 "--rank", "2", "--json"]) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 3 and (tmp_path / "t" / "config.json").is_file()
    written = (tmp_path / "t" / "model.safetensors").read_bytes()
    code = main(["icl", "tune-lm", str(hf_folder), "--corpus", str(corpus), "--out", str(tmp_path / "t"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code != 0 and "exists" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "t" / "model.safetensors").read_bytes() == written  # nothing already written is lost


@pytest.mark.parametrize("out_exists", [True, False])
def test_an_existing_folder_is_refused_before_any_tuning(hf_folder, tmp_path, monkeypatch, out_exists):
    """The minutes of tuning never start for a folder that cannot be written; a new folder (the control) does tune."""
    from fewshot.adapt import lm_tuning

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        calls.append(1)
        raise Reached

    calls = []
    monkeypatch.setattr(lm_tuning, "tune_on_answers", reached)
    if out_exists:
        (tmp_path / "t").mkdir()
        with pytest.raises(ConfigError, match="exists"):
            tune_lm(str(hf_folder), corpus, tmp_path / "t", steps=1)
        assert not calls
    else:
        with pytest.raises(Reached):
            tune_lm(str(hf_folder), corpus, tmp_path / "t", steps=1)
        assert calls == [1]


def test_quantisation_flags(lm):
    """A GGUF-loaded model (de-quantised to float32 at load) is saved as plain weights; any other quantised model, or
    a GGUF one whose weights are not float32, is refused. The quantiser is a stand-in: no GGUF file in the tests."""
    import copy

    from fewshot.adapt.lm_tuning import plain_weights

    model = copy.deepcopy(lm.model)
    plain_weights(model)  # nothing to drop
    for method, dtype, refused in (("gguf", torch.float32, False), ("bitsandbytes_4bit", torch.float32, True), ("gguf", torch.float16, True)):
        model = copy.deepcopy(lm.model).to(dtype)
        model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method=method))
        model.config.quantization_config = {"quant_method": method}
        if refused:
            with pytest.raises(ConfigError, match="cannot save"):
                plain_weights(model)
        else:
            plain_weights(model)
            assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
