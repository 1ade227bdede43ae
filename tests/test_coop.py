"""CoOp: with the context at a template's embeddings and zero steps it is that template's zero-shot
classifier; only the context gets gradients and both towers stay bit-identical; fitting raises support
accuracy on a task a context can solve. Each property is also shown failing on a broken variant."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot.adapt.coop import CoOp, CoOpClassifier, name_tokens
from fewshot.config import load_config
from fewshot.data.pairs import tokenize_captions
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.zeroshot import ZeroShotClassifier, text_prototypes
from fewshot.methods import build_method

TINY = ["method=clip", "data.source=text", "data.image_size=16", "data.channels=3", "data.seq_len=24", "data.vocab_size=300",
        "encoder.options={width: 8}", "method.embed_dim=8", "method.text={dim: 16, depth: 1, heads: 2}", "train.channels_last=false"]
NAMES = ["red circle", "blue square", "green star", "yellow cross"]
LEAD = "a picture of a"


@pytest.fixture(scope="module")
def tokenizer():
    from fewshot.data.scenes import make_pool
    from fewshot.data.tokenizer import train_tokenizer

    return train_tokenizer("\n".join(make_pool(20, size=16, objects=(1, 2), seed=0).row_caption), 300)


def _clip(sensitive: bool = False):
    """A tiny untrained CLIP. ``sensitive``: GPT-2's N(0, 0.02) init leaves an untrained text tower's [CLS] state
    almost independent of the other tokens (class weights at cosine 0.999), which a trained tower is not; wider
    weights and CLIP's clamped scale (100) let the prompt decide the class, as in a trained run."""
    torch.manual_seed(0)
    method = build_method(load_config(overrides=TINY)).eval()
    if sensitive:
        with torch.no_grad():
            for name, p in method.text_encoder.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0, 1.0 if "emb" in name else 0.5 / p.shape[-1] ** 0.5)
            method.logit_scale.fill_(method.max_logit_scale)
    return method


class ContextBeforeCLS(CoOp):
    """Broken: the context enters before [CLS], so every token sits one or more positions off."""

    def prompt_prefix(self):
        prefix = super().prompt_prefix()
        return torch.cat([prefix[:, 1:], prefix[:, :1]], dim=1)


@pytest.mark.parametrize("variant", ["coop", "broken: context before [CLS]"])
def test_zero_steps_from_a_templates_embeddings_is_that_templates_zero_shot_classifier(tokenizer, variant):
    method = _clip()
    images = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def embed_texts(texts):  # what `fewshot zeroshot` does: the prompts' ids through the tower, [CLS] first
        return method.embed_texts(tokenize_captions(tokenizer, texts, 24)[0])

    prototypes = text_prototypes(embed_texts, NAMES, [LEAD + " {}"])
    with torch.no_grad():
        expected = ZeroShotClassifier(prototypes).decision_function(method.embed_images(images)) * method.logit_scale.exp().item()
        coop = (CoOp if variant == "coop" else ContextBeforeCLS)(method, tokenizer, NAMES, lead=LEAD)
        logits = coop(coop.embed_images(images)).double().numpy()
    assert coop.context.shape == (1, len(name_tokens(tokenizer, NAMES, LEAD)[0]), 16)
    if variant == "coop":
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
        # the fit/predict shape: zero steps predicts what zero-shot predicts
        x = coop.embed_images(images)
        clf = CoOpClassifier(lambda: CoOp(method, tokenizer, NAMES, lead=LEAD), steps=0).fit(x[:4], [0, 1, 2, 3])
        assert (clf.predict(x) == expected.argmax(1)).all()
    else:
        assert np.abs(logits - expected).max() > 1e-3


def _towers(method):
    return {k: v.clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("variant", ["coop", "broken: towers left trainable"])
def test_only_the_context_gets_gradients_and_the_towers_stay_bit_identical(tokenizer, variant):
    method = _clip(sensitive=True)
    before = _towers(method)
    coop = CoOp(method, tokenizer, NAMES, class_specific=True)
    if variant != "coop":
        method.requires_grad_(True)
    x = coop.embed_images(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(4)))
    labels = torch.tensor([0, 1, 2, 3] * 2)
    F.cross_entropy(coop(x), labels).backward()
    context = coop.context.clone()
    graded = {n for n, p in coop.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    coop.zero_grad(set_to_none=True)
    coop.fit(x, labels, steps=5, lr=0.05)
    changed = [k for k, v in method.state_dict().items() if not torch.equal(v, before[k])]
    assert not torch.equal(coop.context, context)  # the context trained either way
    if variant == "coop":
        assert graded == {"context"} and changed == [] and not method.training
    else:
        assert len(graded) > 1 and changed


def _teacher_task(method, tokenizer, noise=0.002):
    """Support embeddings a context can classify: the class weights of a CoOp with a random wide context,
    3 noisy copies each, so some context (the teacher's) classifies all 12 correctly."""
    g = torch.Generator().manual_seed(0)
    teacher = CoOp(method, tokenizer, NAMES, lead=LEAD)
    with torch.no_grad():
        teacher.context.normal_(0, 1.0, generator=g)
        labels = torch.arange(len(NAMES)).repeat_interleave(3)
        x = teacher.class_weights()[labels] + noise * torch.randn(len(labels), 8, generator=g)
    assert (teacher(x).argmax(1) == labels).all()
    return x, labels


@pytest.mark.parametrize("variant", ["unified", "class-specific", "broken: context detached"])
def test_fitting_raises_support_accuracy(tokenizer, variant, monkeypatch):
    method = _clip(sensitive=True)
    x, labels = _teacher_task(method, tokenizer)
    if variant.startswith("broken"):
        original = CoOp.prompt_prefix
        # detached, with a zero-weight path left so the loss still has a graph (as a detach inside a larger model would)
        monkeypatch.setattr(CoOp, "prompt_prefix", lambda self: original(self).detach() + 0 * self.context.sum())
    coop = CoOp(method, tokenizer, NAMES, lead=LEAD, class_specific=variant == "class-specific")
    accuracy = lambda: (coop(x).argmax(1) == labels).float().mean().item()  # noqa: E731
    with torch.no_grad():
        start = accuracy()
    losses = coop.fit(x, labels, steps=200, lr=0.2)
    with torch.no_grad():
        end = accuracy()
    assert start <= 0.5
    if variant.startswith("broken"):
        assert end == start and losses[-1] == pytest.approx(losses[0])
    else:
        assert end >= 0.9 and losses[-1] < losses[0]


def test_random_context_of_another_length_starts_small(tokenizer):
    method = _clip()
    coop = CoOp(method, tokenizer, NAMES, n_context=6, generator=torch.Generator().manual_seed(0))
    assert coop.context.shape == (1, 6, 16) and 0.01 < coop.context.std().item() < 0.03  # N(0, 0.02²)
    assert CoOp(method, tokenizer, NAMES, class_specific=True).context.shape[0] == len(NAMES)


@pytest.mark.parametrize("case, error, needle", [
    ("too long", ConfigError, "exceed the text tower's context"),
    ("repeated name", ConfigError, "class names must be distinct"),
    ("no text-transformer", ConfigError, "CoOp needs a CLIP run with its own text-transformer"),
    ("bad label", DataError, "labels must index the 4 class names"),
    ("n_context 0", ConfigError, "n_context must be an integer ≥ 1"),
])
def test_bad_input_is_a_one_line_error(tokenizer, case, error, needle):
    method = _clip()
    with pytest.raises(error, match=needle) as err:
        if case == "too long":
            CoOp(method, tokenizer, NAMES, n_context=30)
        elif case == "repeated name":
            CoOp(method, tokenizer, [*NAMES, NAMES[0]])
        elif case == "no text-transformer":
            CoOp(torch.nn.Linear(2, 2), tokenizer, NAMES)
        elif case == "bad label":
            CoOp(method, tokenizer, NAMES).fit(torch.zeros(2, 8), torch.tensor([0, 4]), steps=1)
        else:
            CoOp(method, tokenizer, NAMES, n_context=0)
    assert "\n" not in str(err.value)
