"""moebench.data: corpora, split, synthetic skew, BPE, prepared files, reading, errors, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import DataConfig
from moebench.data import (
    EOS_ID,
    Document,
    TokenStream,
    assign_val,
    load_documents,
    load_manifest,
    load_tokenizer,
    prepare,
    synthetic_corpus,
    train_bpe,
    zipf_probs,
)
from moebench.data.sources import (
    FILE_DOC_BYTES,
    FILE_DOC_MAX_BYTES,
    cap_bytes,
    source_fingerprint,
    split_sections,
)

SHAKESPEARE = DataConfig(source="shakespeare", vocab_size=512, max_bytes=250_000)
CPYTHON = DataConfig(source="cpython", vocab_size=512, max_bytes=120_000)
SYNTHETIC = DataConfig(
    source="synthetic", vocab_size=300, synthetic_docs=60, synthetic_doc_tokens=64
)
FILES = ("manifest.json", "tokenizer.json", "train.bin", "val.bin")


def digests(d: Path) -> dict[str, str]:
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shakespeare")
    prepare(SHAKESPEARE, out, seed=0)
    return out


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    prepare(SYNTHETIC, out, seed=0)
    return out


@pytest.fixture
def damaged(shakespeare_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared Shakespeare directory that a test may damage."""
    out = tmp_path / "copy"
    shutil.copytree(shakespeare_dir, out)
    return out


def first_doc_tokens(stream: TokenStream) -> list[int]:
    toks = np.asarray(stream.tokens)
    return toks[: int(np.argmax(toks == EOS_ID))].tolist()


# --- real corpora ---------------------------------------------------------------------------


def test_shakespeare_prepare_splits_by_play(shakespeare_dir: Path) -> None:
    m = load_manifest(shakespeare_dir)
    docs = load_documents(SHAKESPEARE)
    train_ids, val_ids = m["splits"]["train"]["doc_ids"], m["splits"]["val"]["doc_ids"]
    assert sorted(train_ids + val_ids) == sorted(d.id for d in docs)
    assert not set(train_ids) & set(val_ids) and train_ids and val_ids
    assert len(val_ids) == max(1, round(SHAKESPEARE.val_fraction * len(docs)))
    assert all("/" in i for i in train_ids)  # "<genre>/<play>"
    assert m["source"] == "shakespeare" and m["tokenizer"] == "byte_bpe"
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512 and m["eos_id"] == EOS_ID
    assert sum(len(d.text.encode()) for d in docs) <= SHAKESPEARE.max_bytes
    for split, ids in (("train", train_ids), ("val", val_ids)):
        s = TokenStream(shakespeare_dir, split, vocab_size=512, config=SHAKESPEARE, verify=True)
        meta = m["splits"][split]
        text_bytes = sum(len(d.text.encode()) for d in docs if d.id in ids)
        assert meta["bytes"] == s.n_bytes == text_bytes
        assert meta["n_docs"] == len(ids) == int((np.asarray(s.tokens) == EOS_ID).sum())
        assert s.tokens[-1] == EOS_ID
        assert (shakespeare_dir / meta["file"]).stat().st_size == 2 * meta["n_tokens"]
        assert s.bits_per_byte(1.0) == pytest.approx(s.n_tokens / text_bytes / np.log(2))


def test_cpython_prepare_decodes_back_to_source(tmp_path: Path) -> None:
    m = prepare(CPYTHON, tmp_path, seed=3)
    ids = m["splits"]["train"]["doc_ids"] + m["splits"]["val"]["doc_ids"]
    assert ids and all(i.endswith(".py") for i in ids)
    assert not any(part in {"test", "tests"} for i in ids for part in i.split("/")[:-1])
    docs = {d.id: d.text for d in load_documents(CPYTHON)}
    tok = load_tokenizer(tmp_path)
    val = TokenStream(tmp_path, "val")
    first_val = m["splits"]["val"]["doc_ids"][0]
    assert tok.decode(first_doc_tokens(val)) == docs[first_val]


def test_cpython_corpus_excludes_test_folders_and_is_sorted() -> None:
    docs = load_documents(DataConfig(source="cpython", max_bytes=2_000_000))
    ids = [d.id for d in docs]
    assert ids == sorted(ids) and len(ids) > 20
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(i.split("/")) for i in ids)


# --- split --------------------------------------------------------------------------------


def test_split_is_by_document_seeded_and_deterministic() -> None:
    ids = [f"doc{i}" for i in range(2000)]
    a, b = assign_val(ids, 0.1, seed=0), assign_val(ids, 0.1, seed=0)
    assert a == b and sum(a) == 200
    assert assign_val(ids, 0.1, seed=1) != a
    # the split depends on the set of ids, not on their order
    shuffled = assign_val(ids[::-1], 0.1, seed=0)
    assert shuffled[::-1] == a
    # held-out documents are spread over the corpus, not a contiguous block
    assert 50 < sum(a[:1000]) < 150


def test_split_keeps_one_document_in_each_split() -> None:
    for n in (2, 3, 5):
        for frac in (0.01, 0.49):
            val = assign_val([f"d{i}" for i in range(n)], frac, seed=7)
            assert any(val) and not all(val)
    with pytest.raises(ValueError, match="at least 2"):
        assign_val(["only"], 0.1, seed=0)


# --- synthetic ------------------------------------------------------------------------------


def test_synthetic_skew_concentrates_topics() -> None:
    top_frac = {}
    for skew in (0.0, 1.0, 2.0):
        cfg = DataConfig(source="synthetic", synthetic_skew=skew, synthetic_docs=2000)
        corpus = synthetic_corpus(cfg, seed=0)
        counts = np.bincount(corpus.topics, minlength=cfg.synthetic_topics)
        top_frac[skew] = counts[0] / counts.sum()
        np.testing.assert_allclose(corpus.topic_probs, zipf_probs(16, skew))
    assert top_frac[0.0] < 0.1 < 0.25 < top_frac[1.0] < 0.45 < top_frac[2.0]


def test_synthetic_topics_prefer_their_own_tokens_and_skew_keeps_sources() -> None:
    cfg = DataConfig(source="synthetic", synthetic_docs=200, synthetic_doc_tokens=128)
    a = synthetic_corpus(cfg, seed=5)
    again = synthetic_corpus(cfg, seed=5)
    np.testing.assert_array_equal(a.tokens, again.tokens)
    for doc_tokens, topic in zip(a.tokens, a.topics, strict=True):
        assert set(doc_tokens.tolist()) <= set(a.alphabet[topic].tolist())
    assert len({tuple(sorted(row)) for row in a.alphabet.tolist()}) == cfg.synthetic_topics
    skewed = synthetic_corpus(cfg.model_copy(update={"synthetic_skew": 3.0}), seed=5)
    np.testing.assert_array_equal(skewed.alphabet, a.alphabet)
    np.testing.assert_array_equal(skewed.transitions, a.transitions)
    assert not np.array_equal(synthetic_corpus(cfg, seed=6).tokens, a.tokens)


def test_synthetic_prepare_layout(synthetic_dir: Path) -> None:
    m = load_manifest(synthetic_dir)
    assert m["tokenizer"] == "synthetic_wordlevel" and m["splits"]["val"]["bytes"] is None
    counts = m["synthetic"]["topic_counts"]
    assert sum(counts["train"]) + sum(counts["val"]) == SYNTHETIC.synthetic_docs
    s = TokenStream(synthetic_dir, "train", verify=True)
    rows = np.asarray(s.tokens).reshape(s.n_docs, SYNTHETIC.synthetic_doc_tokens + 1)
    assert (rows[:, -1] == EOS_ID).all() and (rows[:, :-1] > EOS_ID).all()
    assert s.bits_per_byte(1.0) is None
    assert load_tokenizer(synthetic_dir).decode(rows[0, :3].tolist()) == " ".join(
        f"s{t}" for t in rows[0, :3]
    )


# --- tokenizer ------------------------------------------------------------------------------


def test_bpe_round_trip_and_determinism() -> None:
    texts = ["To be, or not to be: that is the question.\n" * 20, "def f(x):\n    return x\n"]
    tok = train_bpe(texts, vocab_size=300)
    assert 257 < tok.get_vocab_size() <= 300  # fewer merges than asked: the text runs out of pairs
    assert train_bpe(texts, vocab_size=300).to_str() == tok.to_str()
    for s in ["plain text", "  lead\tand\ntrail  ", "naïve café — 東京 🙂", "\x00\x7f", ""]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert max(ids, default=0) < 300
        assert tok.decode(ids) == s


# --- prepare: determinism and resume --------------------------------------------------------


def test_same_config_and_seed_give_identical_files(shakespeare_dir: Path, tmp_path: Path) -> None:
    prepare(SHAKESPEARE, tmp_path, seed=0)
    assert digests(tmp_path) == digests(shakespeare_dir)


def test_up_to_date_directory_is_reused(damaged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("prepare retrained although the directory was complete")

    # patch the module that holds train_bpe
    monkeypatch.setattr(sys.modules["moebench.data.build"], "train_bpe", fail)
    before = digests(damaged)
    assert prepare(SHAKESPEARE, damaged, seed=0) == load_manifest(damaged)
    assert digests(damaged) == before


def test_rerun_after_partial_output_equals_clean_run(shakespeare_dir: Path, damaged: Path) -> None:
    # a run killed after writing some files: no manifest, a short token file, a temp file
    (damaged / "manifest.json").unlink()
    with (damaged / "train.bin").open("r+b") as f:
        f.truncate(100)
    (damaged / ".val.bin.abc123.tmp").write_bytes(b"partial")
    prepare(SHAKESPEARE, damaged, seed=0)
    assert digests(damaged) == digests(shakespeare_dir)
    assert not list(damaged.glob(".*.tmp"))


@pytest.mark.parametrize("change", ["corrupt_bin", "other_seed"])
def test_stale_or_damaged_directory_is_rebuilt(damaged: Path, change: str) -> None:
    if change == "corrupt_bin":
        raw = bytearray((damaged / "val.bin").read_bytes())
        raw[10] ^= 1
        (damaged / "val.bin").write_bytes(bytes(raw))
        prepare(SHAKESPEARE, damaged, seed=0)
        TokenStream(damaged, "val", verify=True)
    else:
        m = prepare(SHAKESPEARE, damaged, seed=1)
        assert m["seed"] == 1 and load_manifest(damaged)["seed"] == 1


# --- reading --------------------------------------------------------------------------------


def test_batch_shapes_shift_and_seeded_offsets(shakespeare_dir: Path) -> None:
    s = TokenStream(shakespeare_dir, "train")
    tokens_BS, targets_BS = s.batch(torch.Generator().manual_seed(1), batch_size=4, seq_len=16)
    assert tokens_BS.shape == targets_BS.shape == (4, 16)
    assert tokens_BS.dtype == targets_BS.dtype == torch.int64
    assert torch.equal(tokens_BS[:, 1:], targets_BS[:, :-1])
    stream = torch.from_numpy(np.asarray(s.tokens).astype(np.int64))
    # documented offsets: torch.randint(0, n_tokens - seq_len, (B,), generator)
    starts_B = torch.randint(0, len(s) - 16, (4,), generator=torch.Generator().manual_seed(1))
    for start, row_S, tgt_S in zip(starts_B, tokens_BS, targets_BS, strict=True):
        assert torch.equal(row_S, stream[start : start + 16])
        assert torch.equal(tgt_S, stream[start + 1 : start + 17])
    again, _ = s.batch(torch.Generator().manual_seed(1), batch_size=4, seq_len=16)
    other, _ = s.batch(torch.Generator().manual_seed(2), batch_size=4, seq_len=16)
    assert torch.equal(again, tokens_BS) and not torch.equal(other, tokens_BS)


def test_iter_eval_covers_consecutive_windows(synthetic_dir: Path) -> None:
    s = TokenStream(synthetic_dir, "val")
    S = 50
    batches = list(s.iter_eval(batch_size=3, seq_len=S))
    windows = s.num_windows(S)
    assert len(batches) == -(-windows // 3) and batches[-1][0].shape[0] == windows - 3 * (
        len(batches) - 1
    )
    tokens = torch.cat([t for t, _ in batches]).reshape(-1)
    targets = torch.cat([y for _, y in batches]).reshape(-1)
    stream = torch.from_numpy(np.asarray(s.tokens).astype(np.int64))
    assert torch.equal(tokens, stream[: windows * S])
    assert torch.equal(targets, stream[1 : windows * S + 1])
    assert len(list(s.iter_eval(batch_size=3, seq_len=S, max_batches=2))) == 2


# --- bad input ------------------------------------------------------------------------------


def test_missing_directory_manifest_and_file(damaged: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data_dir=.*does not exist"):
        TokenStream(tmp_path / "nowhere", "train")
    (damaged / "val.bin").unlink()
    with pytest.raises(ValueError, match=r"token file .*val\.bin is missing"):
        TokenStream(damaged, "val")
    (damaged / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"manifest\.json is missing"):
        TokenStream(damaged, "train")


def test_truncated_and_corrupt_token_files(damaged: Path) -> None:
    with (damaged / "train.bin").open("r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    with pytest.raises(ValueError, match=r"train\.bin has .* bytes.*truncated or corrupt"):
        TokenStream(damaged, "train")
    raw = bytearray((damaged / "val.bin").read_bytes())
    raw[0] ^= 1
    (damaged / "val.bin").write_bytes(bytes(raw))
    TokenStream(damaged, "val")  # fast path: the size is right
    with pytest.raises(ValueError, match=r"val\.bin: sha256 differs"):
        TokenStream(damaged, "val", verify=True)
    raw[0:2] = np.asarray([60000], dtype="<u2").tobytes()
    (damaged / "val.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="token id 60000 >= vocab_size=512"):
        TokenStream(damaged, "val")
    (damaged / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json: sha256 differs"):
        load_tokenizer(damaged)


def test_empty_split_is_refused(damaged: Path) -> None:
    m = load_manifest(damaged)
    m["splits"]["val"]["n_tokens"] = 0
    (damaged / "manifest.json").write_text(json.dumps(m))
    (damaged / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        TokenStream(damaged, "val")


def test_tokenizer_vocab_must_fit_the_manifest(damaged: Path) -> None:
    m = load_manifest(damaged)
    m["tokenizer_vocab_size"] = 600
    (damaged / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="tokenizer_vocab_size=600 exceeds vocab_size=512"):
        TokenStream(damaged, "train")
    with pytest.raises(ValueError, match=r"has 512 entries.*tokenizer_vocab_size=600"):
        load_tokenizer(damaged)


def test_reader_argument_errors(shakespeare_dir: Path) -> None:
    with pytest.raises(ValueError, match="split='test' is not allowed"):
        TokenStream(shakespeare_dir, "test")
    with pytest.raises(ValueError, match="vocab_size=1024 does not match vocab_size=512"):
        TokenStream(shakespeare_dir, "train", vocab_size=1024)
    other = SHAKESPEARE.model_copy(update={"max_bytes": 1000})
    with pytest.raises(ValueError, match=r"data.max_bytes: prepared 250000, requested 1000"):
        TokenStream(shakespeare_dir, "train", config=other)
    s = TokenStream(shakespeare_dir, "val")
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=f"seq_len={len(s)} needs"):
        s.batch(g, 2, len(s))
    with pytest.raises(ValueError, match="batch_size=0"):
        s.batch(g, 0, 8)
    with pytest.raises(ValueError, match="max_batches=0"):
        next(s.iter_eval(2, 8, max_batches=0))


def test_prepare_input_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="seed=-1"):
        prepare(SHAKESPEARE, tmp_path, seed=-1)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"out_dir=.*a_file.* is not a directory"):
        prepare(SHAKESPEARE, tmp_path / "a_file", seed=0)
    with pytest.raises(ValueError, match=r"data.path='/no/such/file' is not a file or a folder"):
        prepare(DataConfig(source="file", path="/no/such/file"), tmp_path, seed=0)
    with pytest.raises(ValueError, match=r"1 document.*at least 2"):
        prepare(DataConfig(source="shakespeare", max_bytes=5000), tmp_path, seed=0)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match=r"data.source='hf'.*needs the `datasets` package"):
        prepare(DataConfig(source="hf", hf_name="tiny_shakespeare"), tmp_path, seed=0)
    assert not (tmp_path / "manifest.json").exists()


# --- local file source ----------------------------------------------------------------------


def test_file_sections_and_cap() -> None:
    para = "word " * 300 + "\n"  # 1501 bytes
    sections = split_sections("\n".join([para] * 30))
    assert len(sections) > 3
    assert all(
        FILE_DOC_BYTES - len(para) <= len(s) <= FILE_DOC_BYTES + len(para) for s in sections[:-1]
    )
    no_blank_lines = split_sections("x" * 100 + ("\n" + "y" * 100) * 1000)
    assert len(no_blank_lines) > 2
    assert all(len(s) <= FILE_DOC_MAX_BYTES + 101 for s in no_blank_lines)
    docs = [Document("a", "abc"), Document("b", "é" * 10), Document("c", "zzz")]
    assert cap_bytes(docs, 7) == [Document("a", "abc"), Document("b", "éé")]
    assert cap_bytes(docs, 6) == [Document("a", "abc"), Document("b", "é")]  # no half char
    assert cap_bytes(docs, None) == docs


def test_file_source_prepare(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    paragraphs = [" ".join(rng.choice(words, size=60)) for _ in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    m = prepare(DataConfig(source="file", path=str(path), vocab_size=300), tmp_path / "out", 0)
    assert m["splits"]["train"]["n_docs"] + m["splits"]["val"]["n_docs"] > 5
    assert m["source_fingerprint"] == "file sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()
    tok = load_tokenizer(tmp_path / "out")
    first = first_doc_tokens(TokenStream(tmp_path / "out", "train"))
    assert tok.decode(first).startswith(paragraphs[0])


def test_file_source_reads_every_file_of_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("first file\n")
    (folder / "b" / "c.md").write_text("second file\n")
    (folder / ".hidden").write_text("never read\n")
    cfg = DataConfig(source="file", path=str(folder), vocab_size=300)
    docs = load_documents(cfg)
    assert [(d.id, d.text) for d in docs] == [("a.txt#000000", "first file"),
                                              ("b/c.md#000000", "second file")]
    before = source_fingerprint(cfg)
    assert before.startswith("folder sha256 ")
    (folder / "a.txt").rename(folder / "z.txt")  # the same bytes under another name
    assert source_fingerprint(cfg) != before
    (folder / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"data.path='.*bad.txt' is not UTF-8 text"):
        load_documents(cfg)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_prepares_and_reports_errors(tmp_path: Path, synthetic_dir: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"data": SYNTHETIC.model_dump(mode="json")}))
    out = tmp_path / "out"
    ok = CliRunner().invoke(app, ["data", "--config", str(cfg), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert digests(out) == digests(synthetic_dir)
    # progress goes through `logging` to stderr; stdout holds the one result line
    assert f"[moebench.data.build] wrote {out / 'manifest.json'}" in ok.stderr
    assert ok.stdout.startswith(f"{out}: synthetic, vocab_size 300") and ok.stdout.count("\n") == 1
    bad = CliRunner().invoke(
        app, ["data", "--config", str(cfg), "--set", "data.vocab_size=7", "--out", str(out)]
    )
    assert bad.exit_code == 2
    assert "data.vocab_size" in bad.stderr and "Traceback" not in bad.output
