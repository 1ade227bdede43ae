"""Token ids every text part agrees on: the specials (first in every BPE vocabulary, so their ids
are fixed) and the target id that cross-entropy ignores (positions that are not predicted)."""

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[CLS]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID = range(len(SPECIAL_TOKENS))
SPECIAL_IDS = tuple(range(len(SPECIAL_TOKENS)))
IGNORE_INDEX = -100  # PyTorch's cross_entropy default ignore_index

__all__ = ["BOS_ID", "CLS_ID", "EOS_ID", "IGNORE_INDEX", "MASK_ID", "PAD_ID", "SPECIAL_IDS", "SPECIAL_TOKENS", "UNK_ID"]
