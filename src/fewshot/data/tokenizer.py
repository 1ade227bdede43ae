"""One byte-level BPE tokenizer per corpus (Hugging Face ``tokenizers``), saved beside the checkpoint.

Byte-level BPE (Radford et al. 2019, GPT-2; Sennrich et al. 2016): every byte is in the base
alphabet, so any string encodes without [UNK] and ``decode(encode(s)) == s`` exactly
(spaces and newlines included). The special tokens come first, so their ids are fixed:
[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, [MASK]=4, [CLS]=5. Training is deterministic: the same
text and vocabulary size give the same merges.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fewshot.data.token_ids import BOS_ID, CLS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from fewshot.errors import CheckpointError, ConfigError, DataError
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials

__all__ = [
    "BOS_ID", "CLS_ID", "EOS_ID", "MASK_ID", "MIN_VOCAB", "PAD_ID", "SPECIAL_TOKENS", "TOKENIZER_FILE", "UNK_ID",
    "decode", "encode", "load_tokenizer", "save_tokenizer", "train_tokenizer",
]


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of at most ``vocab_size`` ids learned from ``text`` (the training split only)."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB} (256 bytes + specials)")
    if not text:
        raise DataError("cannot train a tokenizer on empty text")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    # No prefix space: a leading space would be invented on encode and break the round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One string per line keeps the trainer's word counts (and so the merges) independent of chunking.
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, "special tokens must take the first ids"
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: list[int]) -> str:
    """Text of ``ids``; special tokens are dropped."""
    return tok.decode(list(ids), skip_special_tokens=True)


def save_tokenizer(tok: Tokenizer, run_dir: str | Path) -> Path:
    path = Path(run_dir) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic, like the checkpoint
    return path


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The tokenizer saved in ``run_dir`` (a run folder, or a tokenizer.json itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"no tokenizer at '{path}': a text run keeps its {TOKENIZER_FILE} beside the checkpoint")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise CheckpointError(f"'{path}' is not a readable tokenizer: {exc}") from None
    if [tok.token_to_id(s) for s in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise CheckpointError(f"'{path}' lacks the special tokens {', '.join(SPECIAL_TOKENS)} at ids 0-{len(SPECIAL_TOKENS) - 1}")
    return tok
