"""The mixed-domain corpus (data.source = mixed): three domains, the split per domain, domain
ranges in the manifest, every training and evaluation window inside one domain, and the
training run's loads per domain (summary.json `load_by_domain`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moebench.config import DataConfig, RunConfig
from moebench.data import TokenStream, load_manifest, load_tokenizer, prepare
from moebench.data.sources import MIXED_DOMAINS, domain_of, load_documents
from moebench.train import train

MIXED = DataConfig(source="mixed", vocab_size=512, max_bytes=300_000, val_fraction=0.25,
                   synthetic_docs=80, synthetic_doc_tokens=64)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    prepare(MIXED, out, seed=0)
    return out


def test_documents_of_every_domain_with_prefixed_ids() -> None:
    docs = load_documents(MIXED, seed=0)
    assert [domain_of(d.id) for d in docs] == sorted(
        (domain_of(d.id) for d in docs), key=MIXED_DOMAINS.index)  # stored domain by domain
    for domain in MIXED_DOMAINS:
        mine = [d for d in docs if domain_of(d.id) == domain]
        assert mine and sum(len(d.text.encode()) for d in mine) <= 300_000
    synthetic = next(d for d in docs if domain_of(d.id) == "synthetic")
    assert synthetic.id == "synthetic/000000"
    words = synthetic.text.split(" ")
    assert len(words) == 64 and all(w[0] == "s" and 0 < int(w[1:]) < 512 for w in words)
    assert load_documents(MIXED, seed=0) == docs  # deterministic
    assert load_documents(MIXED, seed=1) != docs  # the synthetic domain follows the seed


def test_manifest_records_domain_ranges_of_each_split(mixed_dir: Path) -> None:
    m = load_manifest(mixed_dir)
    tok = load_tokenizer(mixed_dir)
    for split in ("train", "val"):
        meta = m["splits"][split]
        ranges = meta["domains"]
        assert [r["domain"] for r in ranges] == list(MIXED_DOMAINS)
        assert ranges[0]["start"] == 0 and ranges[-1]["end"] == meta["n_tokens"]
        assert all(a["end"] == b["start"] for a, b in itertools.pairwise(ranges))
        assert sum(r["n_docs"] for r in ranges) == meta["n_docs"]
        stream = TokenStream(mixed_dir, split)
        first_doc = 0
        for r in ranges:  # each range holds whole documents of its domain, in order
            doc_ids = meta["doc_ids"][first_doc : first_doc + r["n_docs"]]
            assert {domain_of(d) for d in doc_ids} == {r["domain"]}
            first_doc += r["n_docs"]
            ids = np.asarray(stream.tokens[r["start"] : r["end"]]).tolist()
            assert ids[-1] == 0 and ids.count(0) == r["n_docs"]  # one EOS per document
            if r["domain"] == "synthetic":
                assert tok.decode(ids[: ids.index(0)]).startswith("s")
    # every domain holds out about val_fraction of its documents
    for i, domain in enumerate(MIXED_DOMAINS):
        n_val = m["splits"]["val"]["domains"][i]["n_docs"]
        n_all = n_val + m["splits"]["train"]["domains"][i]["n_docs"]
        assert n_val == min(n_all - 1, max(1, round(0.25 * n_all))), domain


def test_every_window_lies_inside_one_domain(mixed_dir: Path) -> None:
    S = 32
    stream = TokenStream(mixed_dir, "val")
    ranges = [(r["start"], r["end"]) for r in load_manifest(mixed_dir)["splits"]["val"]["domains"]]
    starts, dom = stream._eval_starts(S)
    assert len(starts) == stream.num_windows(S) == sum((e - s - 1) // S for s, e in ranges)
    for start, d in zip(starts.tolist(), dom.tolist(), strict=True):
        assert ranges[d][0] <= start and start + S + 1 <= ranges[d][1]
    assert dom[:3].tolist() == [0, 1, 2]  # interleaved: a prefix holds every domain
    assert np.array_equal(stream.eval_domains(S), dom)
    batches = list(stream.iter_eval(4, S))
    got = torch.cat([b[0] for b in batches])
    want = torch.stack([torch.from_numpy(np.asarray(stream.tokens[s : s + S], np.int64))
                        for s in starts.tolist()])
    assert torch.equal(got, want)
    # training windows: uniform over the windows inside the ranges, never across a boundary
    gen = torch.Generator().manual_seed(0)
    bounds = [s for s, _ in ranges[1:]]
    for _ in range(50):
        tokens_BS, targets_BS = stream.batch(gen, 16, S)
        assert torch.equal(tokens_BS[:, 1:], targets_BS[:, :-1])
    draws = torch.randint(0, sum(e - s - S for s, e in ranges), (16,),
                          generator=torch.Generator().manual_seed(3))
    first = stream.batch(torch.Generator().manual_seed(3), 16, S)[0]
    for draw, row in zip(draws.tolist(), first, strict=True):
        for s, e in ranges:  # the draw-th window, counting the ranges' windows in order
            if draw < e - s - S:
                start = s + draw
                break
            draw -= e - s - S
        assert not any(start < b < start + S + 1 for b in bounds)
        assert torch.equal(row, torch.from_numpy(np.asarray(stream.tokens[start : start + S],
                                                            np.int64)))


def test_single_domain_streams_keep_their_windows(tmp_path: Path) -> None:
    """Without domain ranges a draw is the offset itself and evaluation windows start at
    0, S, 2S, ...: the data order of every other source is unchanged."""
    cfg = DataConfig(source="synthetic", vocab_size=300, synthetic_docs=20,
                     synthetic_doc_tokens=64)
    prepare(cfg, tmp_path, seed=0)
    stream = TokenStream(tmp_path, "train")
    assert stream.domains == []
    offsets = torch.randint(0, len(stream) - 16, (4,), generator=torch.Generator().manual_seed(5))
    tokens_BS, _ = stream.batch(torch.Generator().manual_seed(5), 4, 16)
    for off, row in zip(offsets.tolist(), tokens_BS, strict=True):
        assert row.tolist() == np.asarray(stream.tokens[off : off + 16]).tolist()
    assert stream._eval_starts(16)[0].tolist() == [16 * i for i in range(stream.num_windows(16))]


def test_training_writes_load_by_domain(mixed_dir: Path, tmp_path: Path) -> None:
    cfg = RunConfig.model_validate({
        "data_dir": str(mixed_dir), "data": MIXED.model_dump(),
        "model": {"d_model": 16, "n_layers": 3, "n_heads": 2, "dense_hidden": 32,
                  "expert_hidden": 8},
        "router": {"num_experts": 8, "top_k": 2},
        "topology": {"num_nodes": 1, "gpus_per_node": 2},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "warmup_steps": 1,
                  "eval_batches": 3, "trace_tokens": 32},
    })
    summary = train(cfg, tmp_path / "run", tmp_path / "ckpt")
    by_domain = summary["load_by_domain"]
    assert list(by_domain) == list(MIXED_DOMAINS)
    loads_DLE = np.array([by_domain[d] for d in MIXED_DOMAINS])
    assert loads_DLE.shape == (3, 2, 8)
    assert (loads_DLE.sum(axis=0) == np.array(summary["load_global"])).all()
    # 12 windows interleaved over 3 domains: 4 windows x 32 tokens x K = 2 per domain, layer
    assert (loads_DLE.sum(axis=2) == 4 * 32 * 2).all()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
