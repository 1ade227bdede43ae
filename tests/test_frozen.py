"""Frozen (Tsimpoukelli et al. 2021) through the one trainer: the encoder learns, the LM stays bit-identical (a variant
that leaves the LM trainable is refused before saving: the negative control), the prefix is the linear map of the
encoder's output, train-blind never sees the images, and the scene corpus for the caption LM."""

import re

import pytest
import torch

from fewshot.config import load_config
from fewshot.data.scenes import COLOURS, PRETRAIN_SHAPES
from fewshot.data.tokenizer import save_tokenizer, train_tokenizer
from fewshot.data import vl_prompts
from fewshot.data.vl_prompts import NONCE_NAMES, glossary, scene_corpus
from fewshot.errors import CheckpointError
from fewshot.methods import build_method
from fewshot.train.checkpoint import Checkpoint, save_checkpoint

CORPUS = scene_corpus(300, 120, seed=0)
IMAGE = ["data.image_size=16", "data.channels=3", "data.seq_len=12", "data.vocab_size=300", "encoder.options={width: 8}",
         "train.channels_last=false"]


def save_tiny_gpt(root, seq_len=96):
    """A random tiny gpt run (dim 16, 2 layers) with a BPE tokenizer learned on the scene corpus, as a run folder."""
    torch.manual_seed(0)
    config = load_config(overrides=["method=gpt", "data.source=text", f"data.seq_len={seq_len}", "data.vocab_size=300", "encoder=text-transformer",
                                    "encoder.options={dim: 16, depth: 2, heads: 2}", "name=gpt", f"out={root}"])
    gpt = build_method(config)
    tensors = {f"model.{k}": v for k, v in gpt.state_dict().items()}
    save_checkpoint(config.run_dir / "checkpoints" / "last", Checkpoint(config.model_dump(mode="json"), 1, tensors, {}))
    save_tokenizer(train_tokenizer(CORPUS, 300), config.run_dir)
    return config.run_dir


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    return save_tiny_gpt(tmp_path_factory.mktemp("gpt"))


def frozen_config(gpt_run, root, *overrides):
    return load_config(overrides=["data.source=pairs", *IMAGE, "method=frozen", f"method.lm.init={gpt_run}", "name=frozen", f"out={root}",
                                  "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.lr=0.01", "train.accelerator=cpu",
                                  "train.devices=1", *overrides])


def scene_pairs(tokenizer):
    from fewshot.data.pairs import pair_set
    from fewshot.data.scenes import make_pool

    pool = make_pool(10, size=16, objects=(1, 2), seed=0)
    return pair_set(pool.images, pool.row_image, pool.row_caption, tokenizer, context=12)


def training_step(method, seed=0):
    """One training forward on 8 scene pairs and 8 seeded random images: (images, tokens, loss, logs)."""
    tokens = scene_pairs(method.text_tokenizer).batch(torch.arange(8))["tokens"]
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loss, logs = method({"images": images, "tokens": tokens}, torch.Generator().manual_seed(seed))
    return images, tokens, loss, logs


@pytest.mark.parametrize("variant", ["frozen lm", "lm left trainable"])
def test_the_lm_is_bit_identical_and_the_encoder_learns(gpt_run, tmp_path, monkeypatch, variant):
    from fewshot.methods.frozen import Frozen
    from fewshot.run import Run
    from fewshot.train.trainer import pretrain

    if variant == "lm left trainable":  # negative control: fingerprinted, but its gradient left on
        original = Frozen.freeze_lm

        def leave_trainable(self):
            original(self)
            self.language_model.model.requires_grad_(True)

        monkeypatch.setattr(Frozen, "freeze_lm", leave_trainable)
    config = frozen_config(gpt_run, tmp_path)
    method = build_method(config)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    if variant == "lm left trainable":
        with pytest.raises(CheckpointError, match="frozen language model changed during training .* refusing to save"):
            pretrain(config, scene_pairs(method.text_tokenizer), progress=False)
        assert not (config.run_dir / "checkpoints" / "last.safetensors").exists()
        return
    pretrain(config, scene_pairs(method.text_tokenizer), progress=False)
    after = Run.open(config.run_dir).method().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("language_model.") for k in changed)
    assert any(k.startswith("encoder.") and "weight" in k for k in changed) and {"to_prefix.weight", "to_prefix.bias"} <= changed


def test_the_prefix_is_the_linear_map_of_the_encoder_output(gpt_run, tmp_path):
    method = build_method(frozen_config(gpt_run, tmp_path)).eval()
    images = torch.rand(3, 3, 16, 16)
    prefix = method.prefix(images)
    f = method.encoder(images)
    by_hand = torch.stack([(method.to_prefix.weight @ f[b] + method.to_prefix.bias).view(2, -1) for b in range(3)])
    assert prefix.shape == (3, 2, method.language_model.dim)
    torch.testing.assert_close(prefix, by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blind", [True, False])
def test_train_blind_never_sees_the_images(gpt_run, tmp_path, blind):
    method = build_method(frozen_config(gpt_run, tmp_path, f"method.blind={str(blind).lower()}")).eval()
    tokens = scene_pairs(method.text_tokenizer).batch(torch.arange(4))["tokens"]
    g = torch.Generator()
    losses = [method({"images": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(s)), "tokens": tokens}, g)[0] for s in (0, 1)]
    assert torch.equal(losses[0], losses[1]) == blind  # the negative control (blind=false) does read its images


def words_of(text):
    return set(text.replace(".", " ").replace("?", " ").replace(",", " ").split())


@pytest.mark.parametrize("evaluation_names", [True, False])
def test_the_scene_corpus_binds_names_in_context(evaluation_names):
    corpus = scene_corpus(300, 120, seed=0, evaluation_names=evaluation_names)
    lines = corpus.splitlines()
    assert len(lines) == 420 and scene_corpus(300, 120, seed=0, evaluation_names=evaluation_names) == corpus
    assert bool(words_of(corpus) & set(NONCE_NAMES)) == evaluation_names
    names = glossary(300)
    assert len(set(names)) == 300 and not set(names) & (set(NONCE_NAMES) | set(PRETRAIN_SHAPES) | set(COLOURS))
    episodes = [line for line in lines if "q: what is this? a: this is a" in line]
    assert episodes
    item = re.compile(r"an? (small|large) (\w+) ([\w-]+)\. this is a ([\w-]+)\.")
    for line in episodes:  # the query shares with every item of the answer's name the attribute that names it
        body, answer = line.rsplit(" q: what is this? a: this is a ", 1)
        _, colour, shape = re.search(r"an? (small|large) (\w+) ([\w-]+)\.$", body).groups()  # the query's description
        named = [(c, s) for _, c, s, n in item.findall(body) if n == answer.rstrip(".")]
        assert named and ({c for c, _ in named} == {colour} or {s for _, s in named} == {shape})


def support_items(line):
    body = line.rsplit(" q: what is this? a: this is a ", 1)[0]
    return re.findall(r"an? (?:small|large) \w+ [\w-]+\. this is a [\w-]+\.", body)


def repeats_in_one_order(items):
    """Whether the support items are one block shown two or more times in the same order."""
    return any(len(items) % p == 0 and len(items) > p and all(items[i] == items[i % p] for i in range(len(items)))
               for p in range(1, len(items)))


@pytest.mark.parametrize("drill", [1.0, 0.0])
def test_copy_drills_repeat_the_support_block_in_one_order(drill):
    lines = scene_corpus(0, 400, seed=1, open_ended=1.0, drill=drill).splitlines()
    episodes = [line for line in lines if "q: what is this? a: this is a" in line]
    assert len(episodes) == 400  # open_ended=1: every text episode is an open-ended one
    periodic = [repeats_in_one_order(support_items(line)) for line in episodes]
    # drills: every episode; without them (the negative control) only the few whose fresh orders coincide
    assert all(periodic) if drill else sum(periodic) < len(periodic) / 4


@pytest.mark.parametrize("uniform", [1.0, 0.0])
def test_uniform_episodes_show_one_description_per_name(uniform):
    lines = scene_corpus(0, 300, seed=2, open_ended=1.0, uniform=uniform).splitlines()
    looks = []  # per episode with a name shown twice or more: whether each name always follows one description
    for line in lines:
        items = re.findall(r"(an? (?:small|large) \w+ [\w-]+)\. this is a ([\w-]+)\.", line.rsplit(" q: what is this?", 1)[0])
        by_name = {}
        for description, name in items:
            by_name.setdefault(name, set()).add(description)
        if any(len([1 for _, n in items if n == name]) > 1 for name in by_name):
            looks.append(all(len(d) == 1 for d in by_name.values()))
    assert looks
    # uniform: every one; otherwise (the negative control) few, where random descriptions happen to coincide
    assert all(looks) if uniform else sum(looks) < len(looks) / 4


def test_corpus_shares_outside_zero_one_are_refused():
    from fewshot.errors import DataError

    with pytest.raises(DataError, match="drill must be a share in \\[0, 1\\], got 2"):
        scene_corpus(10, 10, drill=2)


def recall_answers_match(line):
    """Whether every key asked again in a recall drill is followed by the name listed with it."""
    listed, asked = line[len("recall: "):].split(". ", 1)
    table = dict(pair.split(" ") for pair in listed.split(", "))
    return all(table[key] == value for key, value in (item.split(" ") for item in asked.rstrip(".").split(". ")))


RECALL, REPEAT = vl_prompts._recall, vl_prompts._repeat  # the generators the broken variants below wrap


def broken_recall(rng, names_pool):
    """A negative control: the drill's layout, but each asked key followed by a name drawn afresh."""
    line = RECALL(rng, names_pool)
    listed, asked = line.split(". ", 1)
    fresh = [f"{item.split(' ')[0]} {names_pool[int(rng.integers(len(names_pool)))]}" for item in asked.rstrip(".").split(". ")]
    return f"{listed}. " + " ".join(f"{item}." for item in fresh)


@pytest.mark.parametrize("broken", [False, True])
def test_recall_drills_ask_each_key_for_the_name_listed_with_it(broken, monkeypatch):
    if broken:
        monkeypatch.setattr(vl_prompts, "_recall", broken_recall)
    lines = scene_corpus(0, 300, seed=3, open_ended=0.0, recall=1.0).splitlines()
    assert len(lines) == 300 and all(line.startswith("recall: ") for line in lines)
    names = set(glossary(100, 3)) | set(NONCE_NAMES)
    for line in lines:  # keys distinct scene words or names, values names, 2–4 asked
        listed, asked = line[len("recall: "):].split(". ", 1)
        pairs = [pair.split(" ") for pair in listed.split(", ")]
        assert 2 <= len(pairs) <= 8 and len({k for k, _ in pairs}) == len(pairs) and {v for _, v in pairs} <= names
        assert {k for k, _ in pairs} <= names | set(PRETRAIN_SHAPES) | set(COLOURS) and 2 <= asked.count(".") <= 4
    matched = [recall_answers_match(line) for line in lines]
    # the drill: every answer is the listed one; the broken generator (its names drawn afresh) is caught on most lines
    assert all(matched) if not broken else sum(matched) < len(matched) / 4


def broken_repeat(rng, names_pool):
    """A negative control: two spans drawn independently."""
    first, second = (REPEAT(rng, names_pool).split(". ")[0] for _ in range(2))
    return f"{first}. {second[len('repeat: '):]}."


@pytest.mark.parametrize("broken", [False, True])
def test_repeated_spans_show_one_span_twice(broken, monkeypatch):
    if broken:
        monkeypatch.setattr(vl_prompts, "_repeat", broken_repeat)
    lines = scene_corpus(0, 200, seed=4, open_ended=0.0, repeat=1.0).splitlines()
    assert len(lines) == 200 and all(line.startswith("repeat: ") for line in lines)
    halves = [line[len("repeat: "):].rstrip(".").split(". ") for line in lines]
    assert all(len(h) == 2 and 4 <= len(h[0].split()) <= 24 for h in halves)
    same = [a == b for a, b in halves]
    assert all(same) if not broken else not any(same)


KEYED = vl_prompts._keyed_episode


def broken_keyed(rng, names_pool):
    """A negative control: the keyed layout with each query answered by a name drawn afresh."""
    body, *queries = KEYED(rng, names_pool).split(" q: what is this? a: this is a ")
    return body + "".join(f" q: what is this? a: this is a {names_pool[int(rng.integers(len(names_pool)))]}.{q.split('.', 1)[1]}"
                          for q in queries)


@pytest.mark.parametrize("broken", [False, True])
def test_keyed_episodes_answer_each_key_with_the_name_it_was_given(broken, monkeypatch):
    if broken:
        monkeypatch.setattr(vl_prompts, "_keyed_episode", broken_keyed)
    lines = scene_corpus(0, 300, seed=6, open_ended=0.0, keyed=1.0).splitlines()
    assert len(lines) == 300
    matched = []
    for line in lines:
        named = re.findall(r"(?:^|(?<=\. ))([\w-]+)\. this is a ([\w-]+)\.", line)  # the support: key. this is a name.
        asked = re.findall(r"([\w-]+)\. q: what is this\? a: this is a ([\w-]+)\.", line)
        table = dict(named)
        assert 2 <= len(table) == len(named) <= 5 and 1 <= len(asked) <= 3 and all(k in table for k, _ in asked)
        matched.append(all(table[k] == v for k, v in asked))
    # every answer is the key's name; the broken generator's fresh names are caught on most lines
    assert all(matched) if not broken else sum(matched) < len(matched) / 4


def test_corpus_kinds_follow_their_shares():
    lines = scene_corpus(0, 2000, seed=5, open_ended=0.2, recall=0.2, repeat=0.1, statements=0.4).splitlines()
    kinds = {"open": sum("q: what is this?" in x for x in lines), "recall": sum(x.startswith("recall: ") for x in lines),
             "repeat": sum(x.startswith("repeat: ") for x in lines), "statements": sum("? a " in x for x in lines),
             "vqa": sum("what colour is the" in x for x in lines)}
    assert sum(kinds.values()) == 2000
    for kind, share in (("open", 0.2), ("recall", 0.2), ("repeat", 0.1), ("statements", 0.4), ("vqa", 0.1)):
        assert abs(kinds[kind] / 2000 - share) < 0.035, (kind, kinds)
    assert scene_corpus(300, 200, seed=0) == scene_corpus(300, 200, seed=0, recall=0.0, repeat=0.0, statements=None)


def test_corpus_shares_adding_up_to_more_than_one_are_refused():
    from fewshot.errors import DataError

    with pytest.raises(DataError, match="add up to 1.2, more than 1"):
        scene_corpus(10, 10, open_ended=0.5, recall=0.3, statements=0.4)


@pytest.mark.parametrize("lock", [False, True])
def test_image_init_starts_the_encoder_and_lock_keeps_it(gpt_run, tmp_path, lock):
    """method.image.init loads another run's image tower (here an earlier Frozen run's conv4); it trains on unless
    locked. Against the seeded fresh encoder, so a load that did nothing would fail."""
    from fewshot.errors import ConfigError
    from fewshot.run import Run
    from fewshot.train.trainer import pretrain

    source = frozen_config(gpt_run, tmp_path / "source")
    pretrain(source, scene_pairs(build_method(source).text_tokenizer), progress=False)
    theirs = {k: v for k, v in Run.open(source.run_dir).method().state_dict().items() if k.startswith("encoder.")}
    config = frozen_config(gpt_run, tmp_path / "tuned", f"method.image.init={source.run_dir}", f"method.image.lock={str(lock).lower()}",
                           "train.seed=7")
    torch.manual_seed(config.train.seed)
    method = build_method(config)
    fresh = build_method(frozen_config(gpt_run, tmp_path / "fresh", "train.seed=7"))
    assert all(torch.equal(method.state_dict()[k], v) for k, v in theirs.items())
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in theirs.items())
    pretrain(config, scene_pairs(method.text_tokenizer), progress=False)
    after = Run.open(config.run_dir).method().state_dict()
    moved = {k for k, v in theirs.items() if not torch.equal(after[k], v) and v.is_floating_point()}
    assert (not moved) == lock  # locked: every encoder tensor (BatchNorm statistics too) as loaded
    assert not torch.equal(after["to_prefix.weight"], method.state_dict()["to_prefix.weight"])  # the map learns either way
    with pytest.raises(ConfigError, match="needs pretrained weights"):
        build_method(frozen_config(gpt_run, tmp_path / "bad", "method.image.lock=true"))


# ------------------------------------------------------------------ naming episodes (method.episodes, a departure)


@pytest.fixture(scope="module")
def long_gpt_run(tmp_path_factory):
    return save_tiny_gpt(tmp_path_factory.mktemp("gpt-long"), seq_len=200)


def nll_of_one_sequence(link, sequence, targets):
    """Σ −log p(target) and the count over one unpadded sequence, read position by position (an independent loop)."""
    logits, total, count = link.step(sequence)[0][0], torch.zeros(()), 0
    for j, target in enumerate(targets):
        if j and target is not None:
            total = total - torch.log_softmax(logits[j - 1], dim=-1)[target]
            count += 1
    return total, count


def by_hand(method, pieces, images):
    """An episode's sequence assembled by hand: start ids, each image's two prefix rows, each text piece's ids (a space
    before every piece but the first); targets the text ids, None elsewhere."""
    link, encode = method.language_model, method.language_model.tokenizer.encode
    parts, targets, shown = [link.embed(torch.tensor([link.start_ids]))[0]], [None] * len(link.start_ids), iter(images)
    for j, piece in enumerate(pieces):
        if piece == vl_prompts.IMAGE:
            parts.append(method.prefix(next(shown)[None])[0])
            targets += [None, None]
        else:
            ids = encode(piece if j == 0 else " " + piece, add_special_tokens=False).ids
            parts.append(link.embed(torch.tensor([ids]))[0])
            targets += ids
    return torch.cat(parts)[None], targets


@pytest.mark.parametrize("targets,padding", [("text", "ignored"), ("text", "counted as tokens"), ("answer", "ignored")])
def test_the_episode_loss_is_one_token_mean_over_unpadded_captions_and_episodes(long_gpt_run, tmp_path, monkeypatch, targets, padding):
    """Frozen's loss with ``method.episodes``: one mean over the caption tokens (+ EOS) and the episodes' text tokens
    (``episode_targets=answer``: only the answer after the query), against a loop over each sequence alone (no padding,
    no batching). Negative control: padding targets counted."""
    from fewshot.evaluate.vl_in_context import interleaved_embeddings
    from fewshot.methods import frozen as frozen_module

    method = build_method(frozen_config(long_gpt_run, tmp_path, "method.episodes=3", "method.episode_images=5",
                                        f"method.episode_targets={targets}")).eval()
    if padding == "counted as tokens":
        monkeypatch.setattr(frozen_module, "IGNORE_INDEX", 0)
    tokens = scene_pairs(method.text_tokenizer).batch(torch.arange(4))["tokens"]
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    loss = method({"images": images, "tokens": tokens}, torch.Generator().manual_seed(11))[0]

    link, total, count = method.language_model, torch.zeros(()), 0
    for b in range(4):
        ids = [t for t in tokens[b].tolist() if t != 0] + [link.eos_id]
        sequence = torch.cat([link.prefix_sequence(method.prefix(images[b : b + 1])), link.embed(torch.tensor([ids]))], dim=1)
        s, n = nll_of_one_sequence(link, sequence, [None] * (len(link.start_ids) + 2) + ids)
        total, count = total + s, count + n
    seed = int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(11)))
    for j in range(3):
        episode, drawn = vl_prompts.naming_episode(method.names, seed, j, 16, 5)
        shown = drawn.images[list(episode.images)]
        sequence, scored = by_hand(method, episode.answered(), shown)
        asked = interleaved_embeddings(link, method.prefix, list(shown), list(episode.pieces))
        # trained on the evaluation's own layout with the answer appended (prefix rows: one image at a time vs batched)
        torch.testing.assert_close(sequence[:, : asked.shape[1]], asked, rtol=0, atol=1e-6)
        counted = scored if targets == "text" else [None] * asked.shape[1] + scored[asked.shape[1]:]
        answer_ids = method.language_model.tokenizer.encode(f" {episode.answer}.", add_special_tokens=False).ids
        assert targets == "text" or [t for t in counted if t is not None] == answer_ids  # the name and its full stop
        s, n = nll_of_one_sequence(link, sequence, counted)
        total, count = total + s, count + n
    assert torch.allclose(loss, total / count, atol=1e-5) == (padding == "ignored")


@pytest.mark.parametrize("blind", [True, False])
def test_train_blind_episodes_show_only_blank_images(long_gpt_run, tmp_path, blind):
    method = build_method(frozen_config(long_gpt_run, tmp_path, "method.episodes=2", "method.episode_images=4",
                                        f"method.blind={str(blind).lower()}")).eval()
    seen, prefix = [], method.prefix
    method.prefix = lambda images: (seen.append(images), prefix(images))[1]
    tokens = scene_pairs(method.text_tokenizer).batch(torch.arange(2))["tokens"]
    method({"images": torch.rand(2, 3, 16, 16), "tokens": tokens}, torch.Generator().manual_seed(0))
    assert len(seen) == 3  # the captions' images, then each episode's
    assert all(float(x.abs().max()) == 0 for x in seen) == blind  # the negative control (blind=false) shows real images


def test_an_episode_longer_than_the_lm_is_refused_at_build(gpt_run, tmp_path):
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError, match=r"a naming episode of up to 30 images needs up to \d+ positions, \d+ more than .* lower method.episode_images"):
        build_method(frozen_config(gpt_run, tmp_path, "method.episodes=1", "method.episode_images=30"))
    build_method(frozen_config(gpt_run, tmp_path, "method.episodes=1", "method.episode_images=3"))  # fits its 96 positions


@pytest.mark.parametrize("standardise", [True, False])
def test_a_standardised_prefix_shares_no_direction_and_has_a_token_s_norm(gpt_run, tmp_path, standardise):
    """``standardise_prefix``: over a training batch every prefix coordinate has mean 0, and each row's norm is about the
    LM's median token norm. Negative control: the plain map's prefixes share a mean far from 0."""
    method = build_method(frozen_config(gpt_run, tmp_path, f"method.standardise_prefix={str(standardise).lower()}")).train()
    method.to_prefix.bias.data += 1.0  # a shared direction the standardised prefix must remove
    prefix = method.prefix(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    link = method.language_model
    token_norm = link.embed(torch.arange(link.vocab_size)[None])[0].norm(dim=-1).median()
    mean_size = prefix.detach().mean(0).norm(dim=-1).max()
    assert (float(mean_size) < 1e-4) == standardise
    if standardise:
        assert abs(float(prefix.detach().norm(dim=-1).pow(2).mean().sqrt() / token_norm) - 1) < 0.05


def test_the_vocabulary_prefix_matches_a_loop_over_the_token_table():
    """``vocabulary_prefix`` against a slow transcription: per query, cosine to every row by hand, softmax by exp/sum,
    the mixture as a sum; ``hard`` is exactly the row of highest cosine, with the mixture's gradient."""
    from fewshot.models.prefix_lm import vocabulary_prefix

    g = torch.Generator().manual_seed(0)
    rows, queries = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    soft = vocabulary_prefix(queries, rows, 0.3)
    for b in range(2):
        for j in range(3):
            q = queries[b, j]
            cos = [float(q @ r / (q.norm() * r.norm())) for r in rows]
            e = [torch.exp(torch.tensor(c / 0.3, dtype=torch.float64)) for c in cos]
            mixture = sum(e[v] / sum(e) * rows[v] for v in range(7))
            torch.testing.assert_close(soft[b, j], mixture)
            assert torch.equal(vocabulary_prefix(queries, rows, 0.3, hard=True)[b, j].detach(), rows[int(torch.tensor(cos).argmax())])


@pytest.mark.parametrize("straight_through", [True, False])
def test_the_hard_vocabulary_prefix_passes_the_soft_gradient(straight_through, monkeypatch):
    """Straight-through: the hard prefix's gradient with respect to the queries is the soft mixture's. Negative control:
    the nearest row alone (no straight-through term) passes no gradient."""
    from fewshot.models import prefix_lm

    if not straight_through:
        monkeypatch.setattr(prefix_lm, "vocabulary_prefix", lambda q, rows, t, hard=False: rows[(torch.nn.functional.normalize(q, dim=-1) @
                                                                                                   torch.nn.functional.normalize(rows, dim=-1).T).argmax(-1)])
    g = torch.Generator().manual_seed(1)
    rows, weights = torch.randn(9, 4, generator=g), torch.randn(2, 4, generator=g)
    hard_q = torch.randn(2, 4, generator=g, requires_grad=True)
    soft_q = hard_q.detach().clone().requires_grad_(True)
    out = prefix_lm.vocabulary_prefix(hard_q, rows, 0.5, hard=True)
    if not out.requires_grad:
        assert not straight_through
        return
    (out * weights).sum().backward()
    (prefix_lm.vocabulary_prefix(soft_q, rows, 0.5) * weights).sum().backward()
    torch.testing.assert_close(hard_q.grad, soft_q.grad)
    assert straight_through


@pytest.mark.parametrize("vocab_from", ["lm", "captions"])
def test_a_hard_vocabulary_prefix_is_made_of_allowed_token_rows(gpt_run, tmp_path, vocab_from):
    """``method.vocab_prefix=hard``: every prefix row of a Frozen run is one of the LM's token embeddings, from the whole
    vocabulary (``lm``) or, with ``vocab_from=captions``, only ids its training captions used (kept in the run's state);
    the paper's linear map (``off``) is the control whose rows are no token's."""
    from fewshot.data.token_ids import PAD_ID

    method = build_method(frozen_config(gpt_run, tmp_path, "method.vocab_prefix=hard", f"method.vocab_from={vocab_from}"))
    tokens = scene_pairs(method.text_tokenizer).batch(torch.arange(8))["tokens"]
    method.train()({"images": torch.rand(8, 3, 16, 16), "tokens": tokens}, torch.Generator())
    rows = method.language_model.input_rows().detach()
    prefix = method.eval().prefix(torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))).detach()
    ids = [int(((rows - r).abs().sum(-1) == 0).nonzero()[0]) for r in prefix.flatten(0, 1)]
    seen = set(tokens[tokens != PAD_ID].tolist())
    assert set(ids) <= (seen if vocab_from == "captions" else set(range(len(rows))))
    assert "vocab_allowed" in method.state_dict()
    plain = build_method(frozen_config(gpt_run, tmp_path)).eval().prefix(torch.rand(4, 3, 16, 16)).detach()
    assert not any(((rows - r).abs().sum(-1) == 0).any() for r in plain.flatten(0, 1))


def test_a_standardised_query_is_snapped_to_the_vocabulary_after_standardising(gpt_run, tmp_path):
    """``standardise_prefix`` with ``vocab_prefix``: the map's output is standardised first (cosine ignores the scale), then
    drawn to the token rows: the prefix equals :func:`vocabulary_prefix` of the batch-standardised queries, computed by hand."""
    from fewshot.models.prefix_lm import vocabulary_prefix

    method = build_method(frozen_config(gpt_run, tmp_path, "method.vocab_prefix=soft", "method.standardise_prefix=true")).train()
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    queries = method.to_prefix(method.encoder(images))
    standardised = (queries - queries.mean(0)) / (queries.var(0, unbiased=False) + 1e-5).sqrt()
    by_hand = vocabulary_prefix(standardised.view(16, 2, -1), method.language_model.input_rows(), 0.1)
    torch.testing.assert_close(method.prefix(images), by_hand, rtol=1e-4, atol=1e-5)


def test_the_usage_gap_is_log_v_minus_the_entropy_of_the_mean_weights():
    """``usage_entropy_gap`` against a loop: per prefix position, the mean weight of each token over the prefixes, its
    entropy by hand; 0 for prefixes spread evenly over the tokens, log V for prefixes that all take one token."""
    import math

    from fewshot.models.prefix_lm import usage_entropy_gap

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(6, 2, 5, generator=g, dtype=torch.float64)
    weights = weights / weights.sum(-1, keepdim=True)
    gaps = []
    for j in range(2):
        mean = [sum(float(weights[n, j, v]) for n in range(6)) / 6 for v in range(5)]
        gaps.append(math.log(5) + sum(m * math.log(m) for m in mean))
    assert abs(float(usage_entropy_gap(weights)) - sum(gaps) / 2) < 1e-12
    one_token = torch.zeros(6, 2, 5, dtype=torch.float64)
    one_token[..., 3] = 1
    assert abs(float(usage_entropy_gap(one_token)) - math.log(5)) < 1e-9
    assert abs(float(usage_entropy_gap(torch.eye(5, dtype=torch.float64)[:, None].expand(5, 2, 5)))) < 1e-9


@pytest.mark.parametrize("usage", [1.0, 0.0])
def test_the_usage_term_is_added_to_the_loss_only_when_asked(gpt_run, tmp_path, usage):
    """``method.vocab_usage`` = λ: the step's loss is the captioning loss + λ · the usage gap of every prefix the step
    made; λ = 0 is the control whose loss is the captioning loss alone."""
    from fewshot.models.prefix_lm import usage_entropy_gap, vocabulary_weights

    method = build_method(frozen_config(gpt_run, tmp_path, "method.vocab_prefix=soft", f"method.vocab_usage={usage}")).train()
    images, tokens, loss, logs = training_step(method)
    queries = method.to_prefix(method.encoder(images)).view(8, 2, -1)
    gap = usage_entropy_gap(vocabulary_weights(queries, method.language_model.input_rows(), 0.1))
    torch.testing.assert_close(loss, method.caption_step(images, tokens) + usage * gap)
    assert ("usage_gap" in logs) == bool(usage)


@pytest.mark.parametrize("usage", [1.0, 0.0])
def test_the_usage_term_splits_prefixes_collapsed_onto_one_token(usage):
    """Non-collapse: queries that all start at one token, trained on λ·usage gap alone, end on several tokens. Negative
    control (λ = 0): nothing moves them and they stay on one token."""
    from fewshot.models.prefix_lm import usage_entropy_gap, vocabulary_weights

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 6, generator=g)
    queries = (rows[3] + 0.05 * torch.randn(32, 1, 6, generator=g)).requires_grad_(True)
    assert len(set(vocabulary_weights(queries, rows, 0.1).argmax(-1).flatten().tolist())) == 1
    opt = torch.optim.Adam([queries], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (usage * usage_entropy_gap(vocabulary_weights(queries, rows, 0.1)) + 0 * queries.sum()).backward()
        opt.step()
    used = len(set(vocabulary_weights(queries, rows, 0.1).argmax(-1).flatten().tolist()))
    assert (used >= 6) == bool(usage) and (used == 1) == (not usage)


@pytest.mark.parametrize("recorded", [True, False])
def test_caption_ids_are_recorded_only_by_see_captions(gpt_run, tmp_path, monkeypatch, recorded):
    """``vocab_from=captions``: after a training step the allowed ids are exactly the captions' ids. Negative control: a
    method that records nothing falls back to the whole vocabulary, which the same check refuses."""
    from fewshot.data.token_ids import PAD_ID
    from fewshot.methods.frozen import Frozen

    if not recorded:
        monkeypatch.setattr(Frozen, "see_captions", lambda self, tokens: None)
    method = build_method(frozen_config(gpt_run, tmp_path, "method.vocab_prefix=hard", "method.vocab_from=captions")).train()
    tokens = scene_pairs(method.text_tokenizer).batch(torch.arange(8))["tokens"]
    method({"images": torch.rand(8, 3, 16, 16), "tokens": tokens}, torch.Generator())
    ids, _ = method.vocab_rows()
    assert (set(ids.tolist()) == set(tokens[tokens != PAD_ID].tolist())) == recorded


@pytest.mark.parametrize("straight_through", [True, False])
def test_the_code_prefix_matches_a_loop_and_passes_the_soft_gradient(straight_through, monkeypatch):
    """``code_prefix`` against a slow transcription: per image and position, the scores l + g, the softmax by exp/sum, the
    mixture of that position's codes as a sum; the value is exactly the code of highest score, and (straight-through) its
    gradient with respect to the logits is the soft mixture's. Negative control: the picked code alone passes no gradient."""
    import math

    from fewshot.models import prefix_lm

    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    logits = torch.randn(4, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    noise = prefix_lm.gumbel_noise((4, 2, 5), g).double()
    if not straight_through:
        monkeypatch.setattr(prefix_lm, "code_prefix", lambda l, book, t=1.0, noise=None: book[torch.arange(2), (l + noise).argmax(-1)])
    out = prefix_lm.code_prefix(logits, codebook, 0.5, noise)
    weights = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    mixtures = []
    for b in range(4):
        for j in range(2):
            scores = [float(logits[b, j, c].detach() + noise[b, j, c]) for c in range(5)]
            e = [math.exp(s / 0.5) for s in scores]
            mixtures.append(sum(e[c] / sum(e) * codebook[j, c] for c in range(5)))
            assert torch.equal(out[b, j].detach(), codebook[j, max(range(5), key=scores.__getitem__)])
    if not out.requires_grad:
        assert not straight_through
        return
    (out * weights).sum().backward()
    soft_logits = logits.detach().clone().requires_grad_(True)
    scores = soft_logits + noise
    soft = torch.stack([sum(torch.softmax(scores[b, j] / 0.5, -1)[c] * codebook[j, c] for c in range(5)) for b in range(4) for j in range(2)])
    torch.testing.assert_close(soft.detach(), torch.stack(mixtures))
    (soft.view(4, 2, 3) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, soft_logits.grad)
    assert straight_through


@pytest.mark.parametrize("noisy", [True, False])
def test_the_gumbel_argmax_draws_codes_with_the_softmax_probabilities(noisy):
    """The Gumbel-max identity: argmax(l + g) over 40,000 draws falls on each code at the rate softmax(l) gives (within
    0.01). Negative control: without the noise the argmax is always the likeliest code, far from those rates."""
    from fewshot.models.prefix_lm import gumbel_noise

    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    noise = gumbel_noise((40_000, 4), torch.Generator().manual_seed(0)) if noisy else torch.zeros(40_000, 4)
    rates = torch.bincount((logits + noise).argmax(-1), minlength=4).float() / 40_000
    assert bool((rates - logits.softmax(-1)).abs().max() < 0.01) == noisy


def test_a_coded_prefix_is_one_learned_code_per_position_and_the_codes_learn(gpt_run, tmp_path):
    """``method.prefix_codes=C``: at evaluation every prefix row is exactly one of its position's C codes (the likeliest),
    the same for images whose likeliest codes agree; in training the Gumbel noise comes from the step's generator (one seed,
    one prefix) and picks codes other than the likeliest (the control that noise is drawn); training moves the codebook
    and the map while the LM stays bit-identical; the codes cannot be combined with a vocabulary prefix."""
    from fewshot.errors import ConfigError
    from fewshot.train.trainer import pretrain
    from fewshot.run import Run

    config = frozen_config(gpt_run, tmp_path, "method.prefix_codes=6")
    method = build_method(config)
    images = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prefix = method.eval().prefix(images).detach()
    likeliest = method.code_logits(images).argmax(-1)
    torch.testing.assert_close(prefix, method.codebook.detach()[torch.arange(2), likeliest], rtol=0, atol=0)
    method.train()
    drawn = []
    for _ in range(2):
        method._generator = torch.Generator().manual_seed(3)
        drawn.append(method.prefix(images).detach())
    assert torch.equal(drawn[0], drawn[1])
    picked = (drawn[0][:, :, None] == method.codebook.detach()[None]).all(-1).float().argmax(-1)
    assert (picked != likeliest).any()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    pretrain(config, scene_pairs(method.text_tokenizer), progress=False)
    after = Run.open(config.run_dir).method().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"codebook", "to_codes.weight"} <= changed and not any(k.startswith("language_model.") for k in changed)
    with pytest.raises(ConfigError, match="prefix_codes .* cannot be combined"):
        build_method(frozen_config(gpt_run, tmp_path, "method.prefix_codes=6", "method.vocab_prefix=hard"))


@pytest.mark.parametrize("spread", ["certain", "flat"])
def test_the_information_gap_is_the_mutual_information_by_hand_and_refuses_flat_codes(spread):
    """``code_information_gap`` against a loop: log C − (H(p̄) − mean H(p(·|x))), per position by hand. Codes used evenly
    and each image certain give 0; every image flat over the codes (the negative control) also has a usage gap of 0 —
    ``usage_entropy_gap`` cannot tell them apart — but an information gap of log C."""
    import math

    from fewshot.models.prefix_lm import code_information_gap, usage_entropy_gap

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 2, 5, generator=g, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    gaps = []
    for j in range(2):
        mean = [sum(float(probs[n, j, c]) for n in range(6)) / 6 for c in range(5)]
        h_mean = -sum(m * math.log(m) for m in mean)
        h_each = sum(-sum(float(probs[n, j, c]) * math.log(float(probs[n, j, c])) for c in range(5)) for n in range(6)) / 6
        gaps.append(math.log(5) - (h_mean - h_each))
    assert abs(float(code_information_gap(probs)) - sum(gaps) / 2) < 1e-12
    codes = torch.eye(5, dtype=torch.float64)[:, None].expand(5, 2, 5) if spread == "certain" else torch.full((5, 2, 5), 0.2, dtype=torch.float64)
    assert abs(float(usage_entropy_gap(codes))) < 1e-9
    assert abs(float(code_information_gap(codes)) - (0.0 if spread == "certain" else math.log(5))) < 1e-9


@pytest.mark.parametrize("term, weight", [("usage", 1.0), ("usage", 0.0), ("information", 0.5), ("information", 0.0)])
def test_the_code_terms_are_added_to_the_loss_only_when_asked(gpt_run, tmp_path, term, weight):
    """With ``prefix_codes``: ``vocab_usage`` = λ adds λ · the usage gap, ``code_information`` = μ adds μ · the information gap,
    both of the code probabilities softmax(l) (no noise), to the captioning loss of the same Gumbel draw (replayed from the
    step's seed); weight 0 is the control whose loss is the captioning loss alone. code_information without codes is refused."""
    from fewshot.errors import ConfigError
    from fewshot.models.prefix_lm import code_information_gap, usage_entropy_gap

    option, gap_of, logged = {"usage": ("vocab_usage", usage_entropy_gap, "usage_gap"),
                              "information": ("code_information", code_information_gap, "information_gap")}[term]
    method = build_method(frozen_config(gpt_run, tmp_path, "method.prefix_codes=6", f"method.{option}={weight}")).train()
    images, tokens, loss, logs = training_step(method, seed=5)
    method._generator = torch.Generator().manual_seed(5)  # the same draw again
    gap = gap_of(method.code_logits(images).softmax(-1))
    torch.testing.assert_close(loss, method.caption_step(images, tokens) + weight * gap)
    assert set(logs) == ({logged} if weight else set())
    with pytest.raises(ConfigError, match="code_information .* needs method.prefix_codes"):
        build_method(frozen_config(gpt_run, tmp_path, "method.code_information=0.5"))


@pytest.mark.parametrize("term", ["information", "usage"])
def test_the_information_term_turns_flat_codes_into_certain_spread_ones(term):
    """Non-collapse without flatness: logits of 32 images that start flat over 8 codes, trained on the information gap alone,
    end with each image certain (mean top probability > 0.9) and ≥ 6 codes used. Negative control: the usage gap alone is
    already 0 at flat codes, so it leaves them flat (top probability < 0.2)."""
    from fewshot.models.prefix_lm import code_information_gap, usage_entropy_gap

    logits = (0.01 * torch.randn(32, 1, 8, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    gap_of = code_information_gap if term == "information" else usage_entropy_gap
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        gap_of(logits.softmax(-1)).backward()
        opt.step()
    probs = logits.detach().softmax(-1)
    top, used = float(probs.max(-1).values.mean()), len(set(probs.argmax(-1).flatten().tolist()))
    assert (top > 0.9 and used >= 6) == (term == "information") and (top < 0.2) == (term == "usage")


@pytest.mark.parametrize("caption, words", [
    ("a photo of a small red circle", ("red", "circle")), ("there is a cyan square", ("cyan", "square")),
    ("a purple shape on a black background", ("purple", None)), ("a photo of a large cross", (None, "cross")),
    ("a white arrow and a white circle", None), ("two objects: a small white diamond and a large purple arrow", None),
    ("a red star is left of an orange star", None), ("there is one triangle", None), ("there is one object", None),
    ("a dog on a sofa", None)])
def test_object_words_are_the_colour_and_shape_of_a_one_object_caption(caption, words):
    from fewshot.data.scenes import object_words

    assert object_words(caption) == words


def test_the_word_target_loss_matches_a_loop_and_skips_unlabelled_positions():
    """``word_target_loss`` against a slow transcription: per labelled (image, position), −log of exp(cos/τ) over the sum
    of exp(cos/τ) across the rows, averaged over the labelled ones only; no label at all gives 0."""
    import math

    from fewshot.models.prefix_lm import word_target_loss

    g = torch.Generator().manual_seed(0)
    queries, rows = torch.randn(3, 2, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([[2, -1], [0, 6], [-1, -1]])
    terms = []
    for n in range(3):
        for j in range(2):
            if targets[n, j] < 0:
                continue
            q = queries[n, j]
            cos = [float(q @ r / (q.norm() * r.norm())) for r in rows]
            terms.append(-(cos[int(targets[n, j])] / 0.2 - math.log(sum(math.exp(c / 0.2) for c in cos))))
    assert abs(float(word_target_loss(queries, rows, 0.2, targets)) - sum(terms) / len(terms)) < 1e-9
    assert float(word_target_loss(queries, rows, 0.2, torch.full((3, 2), -1))) == 0.0


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_word_targets_add_the_word_loss_on_the_captions_colour_and_shape_tokens(gpt_run, tmp_path, beta):
    """``method.word_targets`` = β: the step's loss is the captioning loss + β · the word loss, whose targets are, for each
    caption about one object, the tokens of its colour (position 1) and shape (position 2) — rebuilt here from the caption
    strings by the scene world's own word lists, not by the parser. β = 0 is the control without the term."""
    from fewshot.data.token_ids import PAD_ID
    from fewshot.models.prefix_lm import word_target_loss

    method = build_method(frozen_config(gpt_run, tmp_path, "method.vocab_prefix=hard", f"method.word_targets={beta}")).train()
    images, tokens, loss, logs = training_step(method)
    link = method.language_model
    ids, rows = method.vocab_rows()
    expected = torch.full((8, 2), -1)
    for n, caption in enumerate(tokens.tolist()):
        text = link.decode([i for i in caption if i != PAD_ID]).strip()
        words = text.split()
        complete = words[-1] in (*PRETRAIN_SHAPES, "shape", "object") or text.endswith("on a black background")  # not cut at the context
        one = complete and " and " not in text and "," not in text and not text.startswith(("there is one", "there are")) \
            and not any(w in words for w in ("left", "right", "above", "below", "bigger", "larger", "smaller"))
        for j, vocabulary in enumerate((COLOURS, PRETRAIN_SHAPES)):
            said = [w for w in words if w in vocabulary]
            if one and said:
                expected[n, j] = int((ids == link.tokenizer.encode(f" {said[0]}", add_special_tokens=False).ids[0]).nonzero()[0])
    assert (expected >= 0).any()
    torch.testing.assert_close(method.word_target_rows(tokens), expected)
    queries = method.prefix_queries(images)
    torch.testing.assert_close(loss, method.caption_step(images, tokens) + beta * word_target_loss(queries, rows, 0.1, expected))
    assert ("word_loss" in logs) == bool(beta)


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_word_targets_make_the_hard_prefix_the_words_tokens(beta):
    """Trained on the word loss alone, queries that start anywhere end with their hard prefix on exactly the target token
    at every labelled position. Negative control (β = 0): nothing moves them and most stay off their targets."""
    from fewshot.models.prefix_lm import vocabulary_weights, word_target_loss

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 6, generator=g)
    targets = torch.randint(12, (24, 2), generator=g)
    queries = torch.randn(24, 2, 6, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([queries], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (beta * word_target_loss(queries, rows, 0.1, targets) + 0 * queries.sum()).backward()
        opt.step()
    hits = float((vocabulary_weights(queries, rows, 0.1).argmax(-1) == targets).float().mean())
    assert (hits == 1.0) == bool(beta) and (hits < 0.5) == (not beta)


def test_word_targets_need_a_vocabulary_prefix(gpt_run, tmp_path):
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError, match="needs method.vocab_prefix"):
        build_method(frozen_config(gpt_run, tmp_path, "method.word_targets=1.0"))
