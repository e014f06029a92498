"""Tokenizer folders ``AutoTokenizer`` loads as T5's: a tiny one for the tiny checkpoints,
and the one a UMT5 text encoder file embeds as a SentencePiece model (ComfyUI's
``spiece_model`` tensor), written once into a cache folder the daemon's clients can read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import string
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
WORDS = ["a", "the", "of", "in", "on", "and", "cat", "dog", "video", "walks", "beach", "city"]


def write_tokenizer(folder: Path) -> int:
    """Write a Unigram tokenizer ``AutoTokenizer`` loads as a T5 tokenizer; returns its size."""
    pieces = [(t, 0.0) for t in SPECIALS] + [("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    _save(tok, folder, *SPECIALS)
    return len(pieces)


def tiny_sentencepiece() -> bytes:
    """A small SentencePiece model of the tiny tokenizer's words and characters (ids below
    the tiny encoder's vocabulary), trained the way T5's was: unigram, NFKC normalization,
    ``<pad>``, ``</s>``, ``<unk>`` at 0, 1, 2."""
    import io

    from sentencepiece import SentencePieceTrainer

    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    lines.append(" ".join(string.ascii_letters + string.digits))
    model = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=100,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def embedded_tokenizer(proto: bytes, cache: Path) -> Path:
    """The tokenizer folder of SentencePiece model ``proto``: ``cache/<digest>``, written on
    first use (atomically: a folder there is complete) and readable by every user, since
    clients build their tokenizer from it. OSError if it cannot be written, ValueError if
    ``proto`` is not a SentencePiece model."""
    folder = cache / hashlib.blake2b(proto, digest_size=16).hexdigest()
    if folder.is_dir():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # a cache folder of someone else's stays as is
        cache.chmod(0o755)
    new = Path(tempfile.mkdtemp(prefix=".new-", dir=cache))
    try:
        from_sentencepiece(proto, new)
        for f in new.iterdir():
            f.chmod(0o644)
        new.chmod(0o755)
        try:
            os.rename(new, folder)
        except OSError:
            if not folder.is_dir():  # else another process wrote it meanwhile: the same
                raise
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return folder


def from_sentencepiece(proto: bytes, folder: Path) -> None:
    """Write the T5 tokenizer of SentencePiece model ``proto`` to ``folder``: it encodes as
    ``SentencePieceProcessor.encode`` does, then appends ``</s>`` (as T5's does)."""
    from sentencepiece import SentencePieceProcessor

    try:
        sp = SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"not a SentencePiece model: {str(e)[:200]}") from None
    spec = _normalizer_spec(proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    steps = [normalizers.Precompiled(spec[2])] if spec.get(2) else []
    if spec.get(4, 1):  # remove_extra_whitespaces (default true)
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    tok.normalizer = normalizers.Sequence(steps)
    prepend = "always" if spec.get(3, 1) else "never"  # add_dummy_prefix (default true)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend)
    names = (sp.id_to_piece(i) for i in (sp.pad_id(), sp.eos_id(), sp.unk_id()))
    _save(tok, folder, *names)


def _save(tok: Tokenizer, folder: Path, pad: str, eos: str, unk: str) -> None:
    from transformers import T5TokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
    )
    fast = T5TokenizerFast(
        tokenizer_object=tok, eos_token=eos, unk_token=unk, pad_token=pad, extra_ids=0
    )
    fast.save_pretrained(str(folder))


def _normalizer_spec(proto: bytes) -> dict[int, object]:
    """The fields of the model's NormalizerSpec (ModelProto field 3): 2 the precompiled
    character map, 3 add_dummy_prefix, 4 remove_extra_whitespaces."""
    spec = next((v for n, v in _fields(proto) if n == 3), b"")
    return dict(_fields(spec))


def _fields(message: bytes):
    """(field number, value) of each field of a protobuf message: a varint as an int,
    anything length-delimited as bytes, fixed-width fields as raw bytes."""
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire == 2:
            n, pos = _varint(message, pos)
            value, pos = message[pos : pos + n], pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = message[pos : pos + n], pos + n
        else:
            raise ValueError(f"not a SentencePiece model: protobuf wire type {wire}")
        yield key >> 3, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("not a SentencePiece model: truncated protobuf")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
