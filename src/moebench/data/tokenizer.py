"""Tokenizers (HF `tokenizers`), the EOS separator and the on-disk token dtype.

- Text sources: byte-level BPE (GPT-2 pre-tokenization, no normalizer, no prefix space), so
  every UTF-8 string round-trips exactly; trained on the train split only, deterministic for
  a given corpus and vocabulary size. Id 0 is the special token `EOS_TOKEN`, ids 1..256
  are the byte alphabet, the rest are merges (fewer if the corpus runs out of pairs).
- Synthetic source: a word-level tokenizer over the names "s1".."s<V-1>" whose ids are
  the token ids themselves, so `decode` shows a synthetic stream as text.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moebench.progress import on_terminal, progress

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
ENCODE_CHUNK = 1024
"""Documents per `encode_batch` call (each call runs on every core)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `EOS_TOKEN` at id 0, at most `vocab_size` entries."""
    if not texts:
        raise ValueError("cannot train the BPE tokenizer on an empty train split")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=on_terminal(),  # the library's own bar
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID and tok.get_vocab_size() <= vocab_size
    return tok


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """Word-level tokenizer: `EOS_TOKEN` = 0 and "s<i>" = i for i in 1..vocab_size-1."""
    vocab = {EOS_TOKEN: EOS_ID} | {f"s{i}": i for i in range(1, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def encode_documents(tok: Tokenizer, texts: list[str], dtype: np.dtype, desc: str) -> np.ndarray:
    """One flat stream: each document's ids followed by `EOS_ID` (encoded ENCODE_CHUNK
    documents at a time, for the progress bar `desc`)."""
    parts = []
    with progress(desc, "doc", total=len(texts)) as bar:
        for lo in range(0, len(texts), ENCODE_CHUNK):
            encodings = tok.encode_batch(texts[lo:lo + ENCODE_CHUNK], add_special_tokens=False)
            parts += [np.asarray([*e.ids, EOS_ID], dtype=dtype) for e in encodings]
            bar.update(len(encodings))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
