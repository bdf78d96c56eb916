"""Synthetic token streams with a controllable topic skew (reproducible routing pressure).

Each document draws one topic z ~ Zipf(s) over `synthetic_topics` topics,
P(z = k) proportional to (k + 1)^-s (s = `synthetic_skew`; s = 0 is uniform), then emits
`synthetic_doc_tokens` tokens from that topic's Markov source: a first-order chain over the
topic's own alphabet of `SYNTHETIC_ALPHABET` token ids (a random subset of the vocabulary)
with its own transition matrix, every row drawn from Dirichlet(`SYNTHETIC_CONCENTRATION`),
so transitions are sparse and learnable. Different topics use different tokens, so a
router can separate them and the topic skew turns into expert-load skew unless balanced.

The stream bypasses BPE: ids are emitted directly in 1..vocab_size-1 (0 is the EOS
separator shared with the text sources). There is no text, so no bits per byte, and
`data.max_bytes` does not apply (the size is synthetic_docs x synthetic_doc_tokens).

Randomness comes from three independent children of `SeedSequence(seed)` (sources, topic
draws, token draws): changing the skew changes only which topics the documents draw, never
the Markov sources themselves.

Legend: N documents, L tokens per document, T topics, A alphabet size per topic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moebench.config import DataConfig
from moebench.data.tokenizer import EOS_ID

SYNTHETIC_ALPHABET = 32
SYNTHETIC_CONCENTRATION = 0.2


@dataclass(frozen=True)
class SyntheticCorpus:
    """The generated documents plus the generating parameters (for the manifest and tests)."""

    doc_ids: list[str]  # [N]
    topic_probs: np.ndarray  # float64 [T], Zipf probabilities
    topics: np.ndarray  # int64 [N], topic of each document
    alphabet: np.ndarray  # int64 [T, A], token ids of each topic's alphabet
    transitions: np.ndarray  # float64 [T, A, A], row-stochastic over alphabet positions
    tokens: np.ndarray  # int64 [N, L], token ids in 1..vocab_size-1


def zipf_probs(num_topics: int, skew: float) -> np.ndarray:
    """P(k) proportional to (k + 1)^-skew for k = 0..num_topics-1."""
    if num_topics < 1:
        raise ValueError(f"data.synthetic_topics={num_topics} must be >= 1")
    if not skew >= 0.0:
        raise ValueError(f"data.synthetic_skew={skew} must be >= 0")
    w_T = np.arange(1, num_topics + 1, dtype=np.float64) ** -skew
    return w_T / w_T.sum()


def synthetic_corpus(cfg: DataConfig, seed: int) -> SyntheticCorpus:
    """Generate `cfg.synthetic_docs` documents deterministically from `seed`."""
    T, N, L = cfg.synthetic_topics, cfg.synthetic_docs, cfg.synthetic_doc_tokens
    A = min(SYNTHETIC_ALPHABET, cfg.vocab_size - 1)
    rng_sources, rng_topics, rng_tokens = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    alphabet_TA = np.stack(
        [rng_sources.permutation(cfg.vocab_size - 1)[:A] + 1 for _ in range(T)]
    ).astype(np.int64)
    transitions_TAA = rng_sources.dirichlet(np.full(A, SYNTHETIC_CONCENTRATION), size=(T, A))
    cum_TAA = np.cumsum(transitions_TAA, axis=-1)
    cum_TAA[..., -1] = 1.0

    topic_probs_T = zipf_probs(T, cfg.synthetic_skew)
    topics_N = rng_topics.choice(T, size=N, p=topic_probs_T).astype(np.int64)

    state_N = rng_tokens.integers(0, A, size=N)
    u_NL = rng_tokens.random((N, L))
    pos_NL = np.empty((N, L), dtype=np.int64)
    for t in range(L):
        pos_NL[:, t] = state_N
        # inverse-CDF draw of the next alphabet position from row `state` of the topic's chain
        state_N = np.minimum((u_NL[:, t, None] > cum_TAA[topics_N, state_N]).sum(-1), A - 1)
    tokens_NL = alphabet_TA[topics_N[:, None], pos_NL]
    assert tokens_NL.min() > EOS_ID and tokens_NL.max() < cfg.vocab_size
    return SyntheticCorpus(
        doc_ids=[f"synthetic/{i:06d}" for i in range(N)],
        topic_probs=topic_probs_T,
        topics=topics_N,
        alphabet=alphabet_TA,
        transitions=transitions_TAA,
        tokens=tokens_NL,
    )
