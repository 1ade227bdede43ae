"""FROMAGe: the frozen LM stays bit-identical through the one trainer (a tuned LM, the negative control, moves); only
the [RET] row of the extended embedding gets gradient; the retrieval InfoNCE equals a loop transcription that runs each
caption ⊕ [RET] alone; the concatenated pairs put every caption after its own image, and their loss equals one computed
on hand-built sequences; R@K with CIs on a hand-made similarity matrix; ``fewshot caption`` and scene retrieval on a
trained run; bad input as one line."""

import json
import math

import pytest
import torch

from fewshot.cli import main
from fewshot.config import load_config
from fewshot.data.token_ids import IGNORE_INDEX, PAD_ID
from fewshot.errors import CheckpointError, ConfigError
from fewshot.evaluate import scene_retrieval as scene_retrieval_module
from fewshot.evaluate.scene_retrieval import recall_with_ci, scene_retrieval
from fewshot.methods import build_method
from fewshot.methods.fromage import Fromage, caption_layout, pair_groups
from fewshot.objectives.captioning import append_eos

from test_captioning import IMAGE, _pairs, hf_folder, runs  # noqa: F401  (the captioning tests' tiny gpt / clip runs)


def _config(runs, root, *overrides):
    return load_config(overrides=[*IMAGE, "method=fromage", f"method.image.init={runs['clip']}", f"method.lm.init={runs['gpt']}",
                                  "method.prefix_length=2", "method.embed_dim=8", f"out={root}", "name=fromage", "train.steps=3",
                                  "train.batch_size=8", "train.warmup_steps=1", "train.lr=0.01", "train.accelerator=cpu",
                                  "train.devices=1", *overrides])


def _captions(n=4, t=6, seed=0):
    """(n, t) caption ids, right-padded with [PAD], lengths 6, 3, 5, 1 (repeated)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, 300, (n, t), generator=g)
    lengths = torch.tensor([6, 3, 5, 1] * n)[:n]
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = PAD_ID
    return tokens, lengths


def _perturbed(method, seed=0):
    """The trainable parts drawn afresh (a learned-looking [RET] row and maps), so no identity hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        method.logit_scale.fill_(math.log(5.0))
    return method


# ------------------------------------------------------------------ frozen parts, through the trainer


@pytest.mark.parametrize("variant", ["frozen lm", "frozen hugging face lm", "tuned lm", "lm left trainable"])
def test_the_frozen_lm_is_bit_identical_after_training(runs, hf_folder, tmp_path, monkeypatch, variant):  # noqa: F811
    from fewshot.run import Run
    from fewshot.train.trainer import pretrain

    if variant == "lm left trainable":  # negative control: frozen by config, yet its weights get gradient: refused on save
        init = Fromage.__init__

        def unfrozen(self, config):
            init(self, config)
            self.language_model.model.requires_grad_(True)

        monkeypatch.setattr(Fromage, "__init__", unfrozen)
    hf = [f"method.lm.init={hf_folder['with-eos']}"] if variant == "frozen hugging face lm" else []
    config = _config(runs, tmp_path, f"method.lm.tune={str(variant == 'tuned lm').lower()}", *hf)
    before = build_method(config).state_dict()
    method = build_method(config)
    if variant == "lm left trainable":
        with pytest.raises(CheckpointError, match="frozen language model changed") as err:
            pretrain(config, _pairs(method.text_tokenizer), progress=False)
        assert "\n" not in str(err.value)
        return
    pretrain(config, _pairs(method.text_tokenizer), progress=False)
    after = Run.open(config.run_dir).method().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lm = {k for k in before if k.startswith("language_model.")}
    assert bool(changed & lm) == (variant == "tuned lm")  # a tuned LM (not the paper's) moves: the check can see it
    assert not any(k.startswith(("encoder.", "image_projection.")) for k in changed)
    for part in ("ret_embedding", "ret_output", "visual.weight", "text_to_retrieval.weight", "image_to_retrieval.weight", "logit_scale"):
        assert part in changed


@pytest.mark.parametrize("variant", ["frozen lm", "tuned lm"])
def test_only_the_ret_row_of_the_extended_embedding_gets_gradient(runs, tmp_path, variant):
    method = build_method(_config(runs, tmp_path, f"method.lm.tune={str(variant == 'tuned lm').lower()}"))
    tokens, _ = _captions()
    images = torch.rand(4, 3, 16, 16)
    (method.retrieval_loss(images, tokens) + method.caption_step(images, tokens)).backward()
    lm_rows = method.language_model.model.encoder.tok_emb.weight
    assert method.ret_id == lm_rows.shape[0]  # [RET] is one past the LM's own rows
    assert method.ret_embedding.grad is not None and method.ret_embedding.grad.abs().sum() > 0
    extended = torch.cat([lm_rows.grad if lm_rows.grad is not None else torch.zeros_like(lm_rows), method.ret_embedding.grad])
    rows_with_gradient = set(extended.abs().sum(dim=1).nonzero().flatten().tolist())
    if variant == "frozen lm":
        assert rows_with_gradient == {method.ret_id}
    else:  # negative control: a tuned LM's rows of the captions' tokens learn too
        assert rows_with_gradient > {method.ret_id}
    # the spliced table reads the LM's own rows everywhere but at [RET]
    ids = append_eos(tokens, method.ret_id, PAD_ID)
    spliced = method.embed_with_ret(ids)
    table = torch.cat([lm_rows, method.ret_embedding])
    assert torch.equal(spliced, table[ids])


# ------------------------------------------------------------------ the retrieval InfoNCE


def _loop_infonce(method, images, tokens, lengths):
    """L_t2i + L_i2t with every caption run alone, unpadded, as start ⊕ caption ⊕ [RET], and every sum a Python loop."""
    link = method.language_model
    start = link.embed(torch.tensor([link.start_ids], dtype=torch.long))
    texts, pictures = [], []
    for i in range(len(tokens)):
        sequence = torch.cat([start, link.embed(tokens[i : i + 1, : lengths[i]]), method.ret_embedding[None]], dim=1)
        texts.append(method.text_to_retrieval(link.hidden(sequence)[0, -1]))
        pictures.append(method.image_to_retrieval(method.image_embedding(images[i : i + 1]))[0])
    scale = math.exp(min(float(method.logit_scale), math.log(100)))
    n = len(texts)
    s = [[scale * float(torch.dot(texts[i], pictures[j]) / (texts[i].norm() * pictures[j].norm())) for j in range(n)] for i in range(n)]
    t2i = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    i2t = -sum(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    return t2i + i2t


@pytest.mark.parametrize("lm", ["gpt", "hf"])
@pytest.mark.parametrize("variant", ["[RET] after the caption", "[RET] at the padded end"])
def test_the_retrieval_infonce_equals_a_loop_transcription(runs, hf_folder, tmp_path, monkeypatch, variant, lm):  # noqa: F811
    init = [f"method.lm.init={hf_folder['with-eos']}"] if lm == "hf" else []
    method = _perturbed(build_method(_config(runs, tmp_path, *init))).eval()
    if variant == "[RET] at the padded end":  # negative control: the state read where the padded row ends
        def padded_end(self, tokens):
            link = self.language_model
            ids = torch.cat([tokens, torch.full_like(tokens[:, :1], self.ret_id)], dim=1)
            start = link.embed(torch.tensor([link.start_ids], dtype=torch.long)).expand(len(ids), -1, -1)
            return link.hidden(torch.cat([start, self.embed_with_ret(ids)], dim=1))[:, -1]

        monkeypatch.setattr(Fromage, "ret_states", padded_end)
    tokens, lengths = _captions()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = float(method.retrieval_loss(images, tokens))
        slow = _loop_infonce(method, images, tokens, lengths)
    assert (abs(fast - slow) < 1e-4) == (variant == "[RET] after the caption"), (fast, slow)


# ------------------------------------------------------------------ the LM learns to say [RET] (L_emit)


@pytest.mark.parametrize("lm", ["gpt", "hf"])
def test_output_features_times_output_rows_are_the_lms_own_logits(runs, hf_folder, tmp_path, lm):  # noqa: F811
    init = [f"method.lm.init={hf_folder['with-eos']}"] if lm == "hf" else []
    link = build_method(_config(runs, tmp_path, *init)).language_model
    embeds = link.embed(_captions()[0][:, :5])
    logits, _ = link.step(embeds)
    assert torch.allclose(link.output_features(link.hidden(embeds)) @ link.output_rows().T, logits, atol=1e-5)


def _loop_emission(method, tokens, lengths):
    """L_emit with every caption run alone as start ⊕ caption ⊕ [RET]: the LM's own logits over V (``step``), the [RET]
    logit appended as f(h)·r, and the mean of −log p(next) over every caption token and the final [RET] in a loop."""
    link = method.language_model
    start = link.embed(torch.tensor([link.start_ids], dtype=torch.long))
    total, count = 0.0, 0
    for i in range(len(tokens)):
        ids = tokens[i, : lengths[i]].tolist() + [method.ret_id]
        sequence = torch.cat([start, link.embed(tokens[i : i + 1, : lengths[i]]), method.ret_embedding[None]], dim=1)
        own, _ = link.step(sequence)
        ret = link.output_features(link.hidden(sequence)) @ method.ret_output_row[0]
        for j, target in enumerate(ids):
            p = len(link.start_ids) - 1 + j  # the position whose next token is ids[j]
            if p < 0:  # an LM without start ids has nothing before the first token to predict it
                continue
            row = torch.cat([own[0, p], ret[0, p : p + 1]])
            total -= float((row[target] - torch.logsumexp(row, dim=0)).detach())
            count += 1
    return total / count


@pytest.mark.parametrize("tie", ["own output row", "tied"])
@pytest.mark.parametrize("lm", ["gpt", "hf"])
@pytest.mark.parametrize("variant", ["as built", "[RET] left out of the labels"])
def test_the_emission_loss_equals_a_loop_transcription(runs, hf_folder, tmp_path, monkeypatch, variant, lm, tie):  # noqa: F811
    init = [f"method.lm.init={hf_folder['with-eos']}"] if lm == "hf" else []
    method = _perturbed(build_method(_config(runs, tmp_path, *init, f"method.tie_ret={str(tie == 'tied').lower()}"))).eval()
    assert (method.ret_output_row is method.ret_embedding) == (tie == "tied")
    if variant == "[RET] left out of the labels":  # negative control: the loss of the caption tokens alone
        import fewshot.methods.fromage as fromage_module

        labels = fromage_module.caption_labels
        monkeypatch.setattr(fromage_module, "caption_labels",
                            lambda before, ids, pad: labels(before, ids.masked_fill(ids == method.ret_id, pad), pad))
    tokens, lengths = _captions()
    with torch.no_grad():
        hidden, ids, _ = method.ret_pass(tokens)
        fast = float(method.emission_loss(hidden, ids))
    slow = _loop_emission(method, tokens, lengths)
    assert (abs(fast - slow) < 1e-4) == (variant == "as built"), (fast, slow)


@pytest.mark.parametrize("variant", ["L_emit", "retrieval only (λ_e = 0)"])
def test_the_emission_loss_teaches_the_lm_to_say_ret_where_captions_end(runs, tmp_path, variant):
    """Captions of random tokens that end in a full stop (id 5, used nowhere else): trained on L_emit, the [RET] row
    becomes the argmax right after every caption, with a probability there more than twice its mean inside captions;
    the negative control, the same steps on the retrieval loss alone, never makes it likely after a caption."""
    method = build_method(_config(runs, tmp_path, "method.concat_fraction=0"))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(6, 300, (16, 7), generator=g)
    lengths = torch.randint(3, 7, (16,), generator=g)
    tokens[torch.arange(7)[None, :] >= lengths[:, None]] = PAD_ID
    tokens[torch.arange(16), lengths - 1] = 5
    images = torch.rand(16, 3, 16, 16, generator=g)
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        hidden, ids, _ = method.ret_pass(tokens)
        loss = method.emission_loss(hidden, ids) if variant == "L_emit" else method.retrieval_loss(images, tokens)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hidden, _, at = method.ret_pass(tokens)
        p_ret = method.extended_logits(hidden).softmax(dim=-1)[..., method.ret_id]  # position p: [RET] next
    rows = torch.arange(16)
    inside = torch.cat([p_ret[i, : at[i] - 1] for i in range(16)])  # every position whose next token is the caption's
    after, early = method.emits_ret(tokens)
    if variant == "L_emit":  # a random frozen LM's features separate caption ends only in part: [RET] is said at every
        assert after.all(), after  # end, and is far likelier there than inside a caption
        assert p_ret[rows, at - 1].mean() > 2 * inside.mean(), (p_ret[rows, at - 1], inside)
    else:
        assert p_ret[rows, at - 1].max() < 0.05 and not after.any(), p_ret[rows, at - 1]


def test_emits_ret_equals_each_caption_read_alone(runs, tmp_path):
    """``emits_ret`` against a loop over captions read one at a time, unpadded: the argmax over V + 1 right after the
    caption's last token, and the share of the positions from the last start id to the second-last token where it is
    [RET]. The output row is set to 10 × the features at caption 0's first token, so [RET] is said there (inside)."""
    method = _perturbed(build_method(_config(runs, tmp_path))).eval()
    link, starts = method.language_model, len(method.language_model.start_ids)
    tokens, lengths = _captions(8, seed=1)
    with torch.no_grad():
        hidden, _, _ = method.ret_pass(tokens)
        method.ret_output.copy_(10 * link.output_features(hidden)[0, starts][None])
        after, early = method.emits_ret(tokens)
        for i in range(len(tokens)):
            alone, _, _ = method.ret_pass(tokens[i : i + 1, : lengths[i]])
            said = (method.extended_logits(alone)[0].argmax(dim=-1) == method.ret_id).tolist()
            inside = said[starts - 1 : starts - 1 + int(lengths[i])]  # position p predicts p + 1: the caption's own tokens
            assert bool(after[i]) == said[starts - 1 + int(lengths[i])], i
            assert float(early[i]) == pytest.approx(sum(inside) / len(inside)), (i, inside)
    assert early[0] > 0  # the row set above is said inside caption 0


def test_the_training_step_logs_and_adds_the_emission_loss(runs, tmp_path):
    tokens, _ = _captions()
    batch = {"images": torch.rand(4, 3, 16, 16), "tokens": tokens}
    losses = {}
    for weight in (0.0, 1.0, 2.0):
        torch.manual_seed(0)  # the same maps and [RET] row at every weight
        method = build_method(_config(runs, tmp_path, f"method.emit_weight={weight}", "method.concat_fraction=0"))
        loss, logs = method(batch, torch.Generator().manual_seed(0))
        losses[weight] = (float(loss.detach()), logs.get("emit"))
    assert losses[0.0][1] is None and losses[1.0][1] is not None
    assert abs(losses[1.0][0] - losses[0.0][0] - losses[1.0][1]) < 1e-5
    assert abs(losses[2.0][0] - losses[0.0][0] - 2 * losses[1.0][1]) < 1e-5


# ------------------------------------------------------------------ captions concatenated in pairs


def _layout_problems(source, labels, ids, starts, k):
    """Read each sequence back: every caption token must come after its own image's visual block, in order and complete,
    labelled with itself; start, visual and padding positions unlabelled; every image once."""
    b, width = ids.shape
    tokens_at, pad_row = starts + b * k, starts + b * k + b * width
    lengths = (ids != PAD_ID).sum(dim=1).tolist()
    problems, seen_images = [], []
    for r, (row, row_labels) in enumerate(zip(source.tolist(), labels.tolist())):
        image, next_token = None, 0
        for j, (src, label) in enumerate(zip(row, row_labels)):
            if src < starts or src == pad_row:
                problems += [f"row {r} position {j}: start/padding labelled"] if label != IGNORE_INDEX else []
            elif src < tokens_at:
                block, slot = divmod(src - starts, k)
                if slot == 0:
                    if image is not None and next_token != lengths[image]:
                        problems.append(f"row {r}: caption {image} incomplete")
                    image, next_token = block, 0
                    seen_images.append(block)
                problems += [f"row {r} position {j}: visual position labelled"] if label != IGNORE_INDEX else []
            else:
                caption, t = divmod(src - tokens_at, width)
                if caption != image or t != next_token or label != int(ids[caption, t]):
                    problems.append(f"row {r} position {j}: token {t} of caption {caption} after image {image}")
                next_token += 1
        if image is not None and next_token != lengths[image]:
            problems.append(f"row {r}: caption {image} incomplete")
    if sorted(seen_images) != list(range(b)):
        problems.append(f"images placed {sorted(seen_images)}")
    return problems


@pytest.mark.parametrize("variant", ["as built", "images swapped within a pair"])
def test_each_caption_follows_its_own_image_in_the_concatenated_pairs(variant):
    tokens, _ = _captions(n=5)
    ids = append_eos(tokens, 3, PAD_ID)
    groups = [[2, 0], [1], [4, 3]]
    source, labels = caption_layout(ids, groups, starts=1, k=2)
    if variant == "images swapped within a pair":  # negative control: caption 2 now reads image 0's embeddings
        row = source[0].clone()
        first, second = (row >= 1 + 2 * 2) & (row < 1 + 3 * 2), (row >= 1) & (row < 1 + 2)
        source[0, first], source[0, second] = row[second], row[first]
    problems = _layout_problems(source, labels, ids, starts=1, k=2)
    assert (problems == []) == (variant == "as built"), problems


def test_half_the_batch_is_paired_and_the_paired_loss_equals_hand_built_sequences(runs, tmp_path):
    groups = pair_groups(8, 0.5, torch.Generator().manual_seed(0))
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1, 2, 2] and sorted(sum(groups, [])) == list(range(8))
    assert sum(len(g) == 2 for g in pair_groups(64, 0.5, torch.Generator().manual_seed(1))) == 16

    method = _perturbed(build_method(_config(runs, tmp_path))).eval()
    link = method.language_model
    tokens, lengths = _captions()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        fast = float(method.caption_step(images, tokens, torch.Generator().manual_seed(3)))
        hand_groups = pair_groups(4, 0.5, generator)
        prefix = method.prefix(images)
        nll, count = 0.0, 0
        for group in hand_groups:  # start ⊕ P(a) ⊕ caption_a ⊕ EOS ⊕ P(b) ⊕ caption_b ⊕ EOS, no padding anywhere
            pieces, targets = [link.embed(torch.tensor([link.start_ids], dtype=torch.long))[0]], [None] * len(link.start_ids)
            for i in group:
                caption = tokens[i, : lengths[i]].tolist() + [link.eos_id]
                pieces += [prefix[i], link.embed(torch.tensor(caption))]
                targets += [None] * method.prefix_length + caption
            logp = link.step(torch.cat(pieces)[None])[0][0].log_softmax(dim=-1)
            for j, target in enumerate(targets):
                if target is not None:
                    nll -= float(logp[j - 1, target])
                    count += 1
    assert any(len(g) == 2 for g in hand_groups)
    assert abs(fast - nll / count) < 1e-5


# ------------------------------------------------------------------ R@K with CIs


@pytest.mark.parametrize("variant", ["ties against the model", "ties for the model"])
def test_recall_with_ci_on_a_hand_made_similarity_matrix(monkeypatch, variant):
    if variant == "ties for the model":  # negative control: a tie with an irrelevant image counted as a win
        monkeypatch.setattr(scene_retrieval_module, "ranks", lambda s, rel: 1 + ((s > s.masked_fill(~rel, -1e9).amax(1, keepdim=True)) & ~rel).sum(1))
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.0],    # own image first: rank 1
                           [0.8, 0.5, 0.1, 0.0],    # one higher: rank 2
                           [0.3, 0.3, 0.3, 0.3],    # ties with all three others: rank 4
                           [0.9, 0.8, 0.7, 0.1]])   # last: rank 4
    out = recall_with_ci(scores, torch.eye(4, dtype=torch.bool), ks=(1, 2, 5))
    expected_ranks = [1, 2, 4, 4]
    expected = {k: sum(r <= k for r in expected_ranks) / 4 for k in (1, 2, 5)}
    matches = all(abs(out[f"R@{k}"] - expected[k]) < 1e-12 for k in (1, 2, 5)) and out["median_rank"] == 3.0
    assert matches == (variant == "ties against the model"), out
    assert out["queries"] == 4 and out["R@5"] == 1.0 and out["R@5_ci95"] == 0.0
    hits = [1.0, 0.0, 0.0, 0.0]  # R@1's CI is the 95% interval of the mean of the per-query hits
    mean = sum(hits) / 4
    half = 1.96 * math.sqrt(sum((h - mean) ** 2 for h in hits) / 3) / 2
    if variant == "ties against the model":
        assert abs(out["R@1_ci95"] - half) < 1e-9


# ------------------------------------------------------------------ a trained run: captions and retrieval


def test_a_trained_run_captions_and_retrieves_scenes(runs, tmp_path, capsys):
    from fewshot.train.trainer import pretrain

    config = _config(runs, tmp_path)
    method = build_method(config)
    pretrain(config, _pairs(method.text_tokenizer), progress=False)
    assert main(["caption", str(config.run_dir), "--n", "4"]) == 0
    assert "CIDEr-D" in capsys.readouterr().out
    out = scene_retrieval(config.run_dir, n=6, seed=1)
    assert out["method"] == "fromage" and out["images"] == 6
    for relevance in ("instance", "semantic"):
        assert 0 <= out[relevance]["R@1"] <= out[relevance]["R@5"] <= 1
    assert out["semantic"]["R@1"] >= out["instance"]["R@1"]  # more relevant images can only help
    assert main(["data", "scenes", "--n", "6", "--size", "16", "--objects", "1-2", "--seed", "0", "--out", str(tmp_path / "scenes")]) == 0
    capsys.readouterr()
    assert main(["retrieve", str(config.run_dir), str(tmp_path / "scenes" / "manifest.tsv"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert {(r["relevance"], r["direction"]) for r in rows} >= {("instance", "text_to_image"), ("semantic", "text_to_image")}


# ------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(runs, hf_folder, tmp_path):  # noqa: F811
    cases = [
        (["method.image.init=null"], "method.image.init"),  # no CLIP run
        ([f"method.lm.init={hf_folder['without-eos']}"], "no EOS token"),
        (["method.prefix_length=30"], "more than gpt's context of 33"),  # one image's prefix alone is too long
        (["method.prefix_length=10"], "more than gpt's context of 33"),  # fits once, not twice in a concatenated pair
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            build_method(_config(runs, tmp_path, *overrides))
        assert "\n" not in str(err.value)
    build_method(_config(runs, tmp_path, "method.prefix_length=10", "method.concat_fraction=0"))  # no pairs: it fits


@pytest.mark.parametrize("variant", ["saved before ret_output", "saved with it"])
def test_a_run_saved_before_the_own_output_row_loads_with_its_tied_row(runs, tmp_path, variant):
    """An old checkpoint (no ret_output) loads with ret_output = its [RET] input row, so its emission logits equal the
    tied model's; a checkpoint that has the row keeps its own (the control: the rows differ)."""
    old = _perturbed(build_method(_config(runs, tmp_path, "method.tie_ret=true"))).eval()
    state = old.state_dict()
    new = build_method(_config(runs, tmp_path)).eval()
    if variant == "saved with it":
        state = {**state, "ret_output": torch.randn_like(old.ret_embedding)}
    new.load_state_dict(state)
    tokens, _ = _captions()
    with torch.no_grad():
        hidden, _, _ = new.ret_pass(tokens)
        same = torch.allclose(new.extended_logits(hidden), old.extended_logits(hidden))
    assert same == (variant == "saved before ret_output")
