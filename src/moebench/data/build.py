"""`prepare`: a corpus -> train.bin, val.bin, tokenizer.json and manifest.json in one directory.

Token files are raw little-endian uint16 (uint32 when vocab_size > 65536) streams in which
every document is followed by the EOS id 0. The manifest is written last and names the
config, seed and source fingerprint it was made from, plus size and SHA-256 of every file;
a rerun with the same inputs and intact files returns it without work, anything else
(missing, stale or damaged files, a kill half way) is rebuilt from scratch. Every file is
written atomically, so a reader sees either a complete file or none; a stale manifest is
removed before rebuilding, so a directory without manifest is incomplete.

Manifest keys: format, source, source_fingerprint, seed, config (DataConfig dump),
tokenizer ("byte_bpe" | "synthetic_wordlevel"), tokenizer_file, tokenizer_sha256,
tokenizer_vocab_size (entries trained), vocab_size (id space = config vocab_size: every id is
below it), eos_id, dtype, versions, splits.<train|val>.{file, n_tokens, n_docs, bytes
(UTF-8 bytes of the documents' text; null for synthetic), bytes_per_token, sha256, doc_ids},
and for the synthetic source `synthetic` (topic_probs, topic_counts per split). A `mixed`
corpus stores each split domain by domain and adds splits.<split>.domains: one
{domain, start, end, n_docs} per domain, the token range [start, end) its documents fill;
`TokenStream` keeps every window inside one range, so every window has one domain.

Legend: N documents, L tokens per synthetic document.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from moebench.config import DataConfig
from moebench.data.sources import (
    Document,
    assign_val,
    domain_of,
    load_documents,
    source_fingerprint,
)
from moebench.data.synthetic import synthetic_corpus
from moebench.data.tokenizer import (
    EOS_ID,
    encode_documents,
    synthetic_tokenizer,
    token_dtype,
    train_bpe,
)
from moebench.io import (
    atomic_open,
    check_writable_dir,
    remove_temporaries,
    write_json,
    write_text,
)

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SplitData:
    """One split before writing: document ids, the token stream and its text size."""

    doc_ids: list[str]
    tokens: np.ndarray
    n_bytes: int | None
    domains: list[dict[str, Any]] | None = None


SPLIT_TOLERANCE = 0.05
"""Largest gap between the validation share of the tokens and `data.val_fraction` that
passes without a warning (a small corpus has too few documents to split finely)."""


def split_warning(val_fraction: float, splits: dict[str, SplitData]) -> str | None:
    """A warning when the validation split's share of the tokens is more than
    SPLIT_TOLERANCE away from `val_fraction` (the split is by whole documents), else None."""
    n_val, n_train = splits["val"].tokens.size, splits["train"].tokens.size
    share = n_val / max(1, n_val + n_train)
    if abs(share - val_fraction) <= SPLIT_TOLERANCE:
        return None
    docs = {k: len(v.doc_ids) for k, v in splits.items()}
    return (
        f"the validation split holds {share:.0%} of the tokens ({docs['val']} of "
        f"{docs['val'] + docs['train']} documents), not data.val_fraction={val_fraction:g}: "
        "the split keeps documents whole (a play, a source file, a ~8 KB section of a text "
        "file, a dataset row) and this corpus has too few; use more text for a finer split"
    )


def bin_file(split: str) -> str:
    return f"{split}.bin"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def identity(cfg: DataConfig, seed: int) -> dict[str, Any]:
    """What decides the output; a manifest is reused only if all of it is equal."""
    return {
        "format": FORMAT,
        "config": cfg.model_dump(mode="json"),
        "seed": seed,
        "source_fingerprint": source_fingerprint(cfg),
    }


def reusable_manifest(out: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if it matches `ident` and every file's size and SHA-256."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in ident.items()):
        return None
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        files = [(manifest["tokenizer_file"], None, manifest["tokenizer_sha256"])] + [
            (s["file"], s["n_tokens"] * itemsize, s["sha256"]) for s in manifest["splits"].values()
        ]
    except (KeyError, TypeError, AttributeError):
        return None
    for name, size, digest in files:
        path = out / name
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return None
        if sha256_file(path) != digest:
            return None
    return manifest


def text_splits(cfg: DataConfig, seed: int) -> tuple[Tokenizer, str, dict[str, SplitData]]:
    """Documents -> split by document -> BPE trained on train -> encoded streams."""
    logger.info(
        f"loading source {cfg.source!r}"
        + (f" (max_bytes={cfg.max_bytes})" if cfg.max_bytes else "")
    )
    docs = load_documents(cfg, seed)
    groups: dict[str, list[Document]] = {}  # one group, or one per domain of `mixed`
    for d in docs:
        groups.setdefault(domain_of(d.id) if cfg.source == "mixed" else "", []).append(d)
    by_split: dict[str, list[Document]] = {"train": [], "val": []}
    for group in groups.values():
        is_val = assign_val([d.id for d in group], cfg.val_fraction, seed)
        for d, v in zip(group, is_val, strict=True):
            by_split["val" if v else "train"].append(d)
    n_bytes = {k: sum(len(d.text.encode("utf-8")) for d in v) for k, v in by_split.items()}
    logger.info(
        f"{len(docs)} documents: train {len(by_split['train'])} ({n_bytes['train']} bytes), "
        f"val {len(by_split['val'])} ({n_bytes['val']} bytes)"
    )
    logger.info(f"training byte-level BPE (vocab_size={cfg.vocab_size}) on the train split")
    tok = train_bpe([d.text for d in by_split["train"]], cfg.vocab_size)
    dtype = token_dtype(cfg.vocab_size)
    splits = {}
    for name, split_docs in by_split.items():
        logger.info(f"encoding {name}")
        tokens = encode_documents(tok, [d.text for d in split_docs], dtype, f"encoding {name}")
        domains = domain_ranges(tok, split_docs) if cfg.source == "mixed" else None
        splits[name] = SplitData([d.id for d in split_docs], tokens, n_bytes[name], domains)
    return tok, "byte_bpe", splits


def domain_ranges(tok: Tokenizer, docs: list[Document]) -> list[dict[str, Any]]:
    """{domain, start, end, n_docs} of each domain's run of consecutive documents in the
    encoded stream (each document's ids plus its EOS)."""
    lengths = [len(e.ids) + 1 for e in tok.encode_batch([d.text for d in docs],
                                                       add_special_tokens=False)]
    ranges: list[dict[str, Any]] = []
    start = 0
    for doc, n in zip(docs, lengths, strict=True):
        domain = domain_of(doc.id)
        if not ranges or ranges[-1]["domain"] != domain:
            ranges.append({"domain": domain, "start": start, "end": start, "n_docs": 0})
        ranges[-1]["end"] += n
        ranges[-1]["n_docs"] += 1
        start += n
    return ranges


def synthetic_splits(
    cfg: DataConfig, seed: int
) -> tuple[Tokenizer, str, dict[str, SplitData], dict[str, Any]]:
    """Zipf-topic Markov documents split by document; ids are written as generated."""
    logger.info(
        f"generating {cfg.synthetic_docs} synthetic documents x {cfg.synthetic_doc_tokens} "
        f"tokens ({cfg.synthetic_topics} topics, skew {cfg.synthetic_skew})"
    )
    corpus = synthetic_corpus(cfg, seed)
    is_val = np.asarray(assign_val(corpus.doc_ids, cfg.val_fraction, seed))
    dtype = token_dtype(cfg.vocab_size)
    eos_N1 = np.full((len(corpus.doc_ids), 1), EOS_ID, dtype=np.int64)
    rows_NL = np.concatenate([corpus.tokens, eos_N1], axis=1).astype(dtype)
    splits, topic_counts = {}, {}
    for name, mask_N in (("train", ~is_val), ("val", is_val)):
        ids = [d for d, m in zip(corpus.doc_ids, mask_N, strict=True) if m]
        splits[name] = SplitData(ids, rows_NL[mask_N].reshape(-1), None)
        topic_counts[name] = np.bincount(
            corpus.topics[mask_N], minlength=cfg.synthetic_topics
        ).tolist()
    extra = {"topic_probs": corpus.topic_probs.tolist(), "topic_counts": topic_counts}
    return synthetic_tokenizer(cfg.vocab_size), "synthetic_wordlevel", splits, extra


def prepare(cfg: DataConfig, out_dir: str | Path, seed: int) -> dict[str, Any]:
    """Write train.bin, val.bin, tokenizer.json and manifest.json under `out_dir`.

    Returns the manifest. Skips all work if `out_dir` already holds a complete, intact
    output of the same config, seed and source; otherwise rebuilds everything (so resuming
    after a kill is rerunning). Raises ValueError for bad input (naming the field).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    out = Path(out_dir)
    check_writable_dir(out, "out_dir")
    ident = identity(cfg, seed)
    if (manifest := reusable_manifest(out, ident)) is not None:
        logger.info(f"{out} is up to date (manifest, sizes and sha256 match); nothing to do")
        return manifest

    extra: dict[str, Any] = {}  # built before touching `out`: bad input leaves it as it was
    if cfg.source == "synthetic":
        tok, kind, splits, extra = synthetic_splits(cfg, seed)
    else:
        tok, kind, splits = text_splits(cfg, seed)

    if warning := split_warning(cfg.val_fraction, splits):
        logger.warning(warning)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    remove_temporaries(out, (TOKENIZER_FILE, MANIFEST, *map(bin_file, SPLITS)))
    dtype = token_dtype(cfg.vocab_size)
    assert all(s.tokens.dtype == dtype for s in splits.values())

    tok_text = tok.to_str()
    write_text(out / TOKENIZER_FILE, tok_text)
    split_meta = {}
    for name in SPLITS:
        s = splits[name]
        payload = s.tokens.tobytes()
        with atomic_open(out / bin_file(name), "wb") as f:
            f.write(payload)
        n_tokens = int(s.tokens.size)
        split_meta[name] = {
            "file": bin_file(name),
            "n_tokens": n_tokens,
            "n_docs": len(s.doc_ids),
            "bytes": s.n_bytes,
            "bytes_per_token": None if s.n_bytes is None else s.n_bytes / n_tokens,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "doc_ids": s.doc_ids,
            **({"domains": s.domains} if s.domains is not None else {}),
        }
        logger.info(f"wrote {bin_file(name)}: {n_tokens} tokens, {len(s.doc_ids)} documents")

    manifest = {
        **ident,
        "source": cfg.source,
        "tokenizer": kind,
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_sha256": hashlib.sha256(tok_text.encode("utf-8")).hexdigest(),
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "vocab_size": cfg.vocab_size,
        "eos_id": EOS_ID,
        "dtype": dtype.name,
        "versions": {"tokenizers": tokenizers.__version__, "numpy": np.__version__},
        "splits": split_meta,
        **({"synthetic": extra} if extra else {}),
    }
    write_json(out / MANIFEST, manifest)
    logger.info(f"wrote {out / MANIFEST}")
    return manifest
