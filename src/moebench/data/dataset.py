"""Reading prepared data: the manifest, the tokenizer and memory-mapped token streams.

`TokenStream` checks a split against its manifest when opened (file present, size =
n_tokens x itemsize, every id < vocab_size, optionally SHA-256) and serves
- `batch`: random windows (training), offsets from a seeded `torch.Generator`, so the
  data order is part of the generator state that a checkpoint saves;
- `iter_eval`: consecutive windows from the start of the split (evaluation, traces).
A window is seq_len + 1 consecutive tokens; tokens are its first seq_len, targets its last
seq_len (targets[:, i] = tokens[:, i + 1]). Windows may cross document boundaries (EOS).

A split of a `mixed` corpus is cut into domain ranges (manifest `domains`), and every window
lies inside one: `batch` draws uniformly among all such windows; `iter_eval` takes each
range's consecutive windows and interleaves the domains (the k-th window of every domain,
in domain order, then the (k+1)-th), so any prefix of the evaluation is stratified by
domain; `eval_domains` gives each evaluation window's domain index. Without domain ranges
the whole split is one range and both behave as described above.

Legend: B batch (windows), S sequence length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from moebench.config import DataConfig
from moebench.data.build import FORMAT, MANIFEST, SPLITS, sha256_file

_RERUN = "rerun `moebench data` for this directory"


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory; ValueError if the directory is missing/incomplete."""
    d = Path(data_dir)
    if not d.is_dir():
        raise ValueError(f"data_dir={str(d)!r} does not exist: run `moebench data --out {d}`")
    path = d / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} is missing: {d} is not a complete data directory; {_RERUN}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {_RERUN}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format={got!r}, expected {FORMAT}; {_RERUN}")
    return manifest


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer.json of a prepared directory, checked against the manifest."""
    manifest = load_manifest(data_dir)
    path = Path(data_dir) / manifest["tokenizer_file"]
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} is missing; {_RERUN}")
    if sha256_file(path) != manifest["tokenizer_sha256"]:
        raise ValueError(f"tokenizer file {path}: sha256 differs from the manifest; {_RERUN}")
    tok = Tokenizer.from_file(str(path))
    if tok.get_vocab_size() != manifest["tokenizer_vocab_size"]:
        raise ValueError(
            f"tokenizer file {path} has {tok.get_vocab_size()} entries, the manifest says "
            f"tokenizer_vocab_size={manifest['tokenizer_vocab_size']}; {_RERUN}"
        )
    return tok


class TokenStream:
    """One split of a prepared directory as a read-only memory-mapped 1-D token array.

    Args:
        data_dir: output directory of `moebench data` / `prepare`.
        split: "train" or "val".
        vocab_size: the model's vocabulary; ValueError if the manifest's differs.
        config: the run's DataConfig; ValueError naming the fields that differ from the
            config the directory was prepared with.
        verify: also check the file's SHA-256 (reads the whole file once).
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        *,
        vocab_size: int | None = None,
        config: DataConfig | None = None,
        verify: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed (allowed: {', '.join(SPLITS)})")
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(self.data_dir)
        m = self.manifest
        self.vocab_size: int = m["vocab_size"]
        self.eos_id: int = m["eos_id"]
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} does not match vocab_size={self.vocab_size} of the "
                f"data in {self.data_dir}; prepare the data with data.vocab_size={vocab_size}"
            )
        if m["tokenizer_vocab_size"] > self.vocab_size:
            raise ValueError(
                f"{self.data_dir}: tokenizer_vocab_size={m['tokenizer_vocab_size']} exceeds "
                f"vocab_size={self.vocab_size}; {_RERUN}"
            )
        if config is not None and (want := config.model_dump(mode="json")) != m["config"]:
            diff = [
                f"data.{k}: prepared {m['config'].get(k)!r}, requested {v!r}"
                for k, v in want.items()
                if m["config"].get(k) != v
            ]
            raise ValueError(f"{self.data_dir} was prepared with another config: {'; '.join(diff)}")

        meta = m["splits"][split]
        self.n_tokens: int = meta["n_tokens"]
        self.n_docs: int = meta["n_docs"]
        self.n_bytes: int | None = meta["bytes"]
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self.path = self.data_dir / meta["file"]
        if not self.path.is_file():
            raise ValueError(f"token file {self.path} is missing; {_RERUN}")
        size, want_size = self.path.stat().st_size, self.n_tokens * self.dtype.itemsize
        if size != want_size:
            raise ValueError(
                f"token file {self.path} has {size} bytes, the manifest says n_tokens="
                f"{self.n_tokens} x {self.dtype.itemsize} = {want_size}: truncated or "
                f"corrupt; {_RERUN}"
            )
        if self.n_tokens == 0:
            raise ValueError(f"split {split!r} of {self.data_dir} is empty (n_tokens=0)")
        if verify and sha256_file(self.path) != meta["sha256"]:
            raise ValueError(f"token file {self.path}: sha256 differs from the manifest; {_RERUN}")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        ranges = meta.get("domains") or [{"domain": None, "start": 0, "end": self.n_tokens}]
        self.domains: list[str] = [r["domain"] for r in ranges if r["domain"] is not None]
        self._ranges = [(r["start"], r["end"]) for r in ranges]
        if (top := int(self.tokens.max())) >= self.vocab_size:
            raise ValueError(
                f"token file {self.path} holds token id {top} >= vocab_size={self.vocab_size}: "
                f"corrupt; {_RERUN}"
            )

    def __len__(self) -> int:
        return self.n_tokens

    def bits_per_byte(self, loss_nats: float) -> float | None:
        """Mean cross-entropy per token (nats) -> bits per UTF-8 byte of the split's text.

        Uses the split's tokens per byte (EOS tokens included); None for synthetic data.
        """
        if not self.n_bytes:
            return None
        return loss_nats / math.log(2) * self.n_tokens / self.n_bytes

    def _check_window(self, batch_size: int, seq_len: int) -> None:
        _check_positive("batch_size", batch_size)
        _check_positive("seq_len", seq_len)
        shortest = min(end - start for start, end in self._ranges)
        if seq_len + 1 > shortest:
            where = "" if not self.domains else " in its shortest domain"
            raise ValueError(
                f"seq_len={seq_len} needs seq_len + 1 = {seq_len + 1} tokens, split "
                f"{self.split!r} of {self.data_dir} has {shortest}{where}"
            )

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        win_BS1 = np.stack([self.tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        win_BS1 = torch.from_numpy(win_BS1)
        return win_BS1[:, :-1].contiguous(), win_BS1[:, 1:].contiguous()

    def batch(
        self, generator: torch.Generator, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` windows drawn uniformly among all windows inside one domain range
        (without domains: offsets uniform in [0, n_tokens - seq_len - 1]).

        The draws come from `torch.randint(..., generator=generator)` (a CPU generator);
        returns (tokens_BS, targets_BS), int64 on CPU.
        """
        self._check_window(batch_size, seq_len)
        fits_R = np.array([end - start - seq_len for start, end in self._ranges])
        draws_B = torch.randint(0, int(fits_R.sum()), (batch_size,), generator=generator).numpy()
        first_R = np.cumsum(fits_R) - fits_R  # draws below first_R[r] + fits_R[r]: range r
        range_B = np.searchsorted(first_R, draws_B, side="right") - 1
        starts_B = np.array([s for s, _ in self._ranges])[range_B] + draws_B - first_R[range_B]
        return self._windows(starts_B, seq_len)

    def _eval_starts(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Start and domain-range index of every evaluation window, in evaluation order:
        range r's starts start_r, start_r + S, ... while a window fits, interleaved."""
        starts, ranges, ranks = [], [], []
        for r, (start, end) in enumerate(self._ranges):
            n = (end - start - 1) // seq_len
            starts.append(start + seq_len * np.arange(n))
            ranges.append(np.full(n, r))
            ranks.append(np.arange(n))
        order = np.lexsort((np.concatenate(ranges), np.concatenate(ranks)))
        return np.concatenate(starts)[order], np.concatenate(ranges)[order]

    def num_windows(self, seq_len: int) -> int:
        """Consecutive evaluation windows (per domain range): starts 0, S, 2S, ... while a
        window fits."""
        return sum((end - start - 1) // seq_len for start, end in self._ranges)

    def eval_domains(self, seq_len: int) -> np.ndarray:
        """int64 [windows]: index into `domains` of every evaluation window, in `iter_eval`
        order (all 0 without domains)."""
        return self._eval_starts(seq_len)[1]

    def iter_eval(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens_BS, targets_BS) of consecutive windows from the start of the split.

        Windows start at multiples of seq_len (per domain range, interleaved: see the module
        docstring); the last batch holds the remaining windows
        (may be smaller than batch_size); at most `max_batches` batches (None = all).
        """
        self._check_window(batch_size, seq_len)
        if max_batches is not None:
            _check_positive("max_batches", max_batches)
        starts_W = self._eval_starts(seq_len)[0]
        n_batches = math.ceil(len(starts_W) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            yield self._windows(starts_W[b * batch_size : (b + 1) * batch_size], seq_len)
