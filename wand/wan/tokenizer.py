"""A tiny T5-style tokenizer folder built offline (the real one is a 256k-piece UMT5 vocab)."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
WORDS = ["a", "the", "of", "in", "on", "and", "cat", "dog", "video", "walks", "beach", "city"]


def write_tokenizer(folder: Path) -> int:
    """Write a Unigram tokenizer ``AutoTokenizer`` loads as a T5 tokenizer; returns its size."""
    from transformers import T5TokenizerFast

    pieces = [(t, 0.0) for t in SPECIALS] + [("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    fast.save_pretrained(str(folder))
    return len(pieces)
