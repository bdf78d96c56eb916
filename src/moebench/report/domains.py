"""Domain specialisation of experts (the analysis of DeepSeek-V3 Fig. 9) from per-domain
validation loads `load_DLE` (routed assignments of domain d's tokens to expert e in MoE layer
l; summary.json's `load_by_domain`). See docs/statistics.md for the definitions."""

from __future__ import annotations

import numpy as np


def domain_loads(
    load_by_domain: dict[str, list[list[float]]], where: str = "load_by_domain"
) -> tuple[list[str], np.ndarray]:
    """Domains (sorted) and their loads as one array `load_DLE`; ValueError naming `where`
    on a bad shape."""
    problem = (
        f"{where} must be {{domain: [[load per expert] per layer]}} of non-negative numbers, "
        "the same shape for every domain"
    )
    domains = sorted(load_by_domain)
    try:
        load_DLE = np.asarray([load_by_domain[d] for d in domains], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    if not domains or load_DLE.ndim != 3 or (load_DLE < 0).any():
        raise ValueError(f"{problem}; got shape {load_DLE.shape}")
    return domains, load_DLE


def relative_share(load_DLE: np.ndarray) -> np.ndarray:
    """Each domain's share of each expert's load over its share of the layer's load,
    p(e | d) / p(e): 1 = the expert serves the domain in proportion, >1 = it specialises in it.
    NaN where the expert or the domain has no load."""
    total_L = load_DLE.sum(axis=(0, 2))
    p_e_LE = load_DLE.sum(axis=0) / total_L[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_e_given_d_DLE = load_DLE / load_DLE.sum(axis=2, keepdims=True)
        return p_e_given_d_DLE / p_e_LE[None]


def specialisation_bits(load_DLE: np.ndarray) -> np.ndarray:
    """Specialisation score per layer: the mutual information I(domain; expert) in bits of
    one routed assignment = sum_d p(d) KL(p(e|d) || p(e)). 0 when every domain spreads its
    load like the whole set does; at most min(log2 #domains, log2 #experts)."""
    joint_DLE = load_DLE / load_DLE.sum(axis=(0, 2), keepdims=True)
    p_d_DL = joint_DLE.sum(axis=2, keepdims=True)
    p_e_LE = joint_DLE.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = joint_DLE * np.log2(joint_DLE / (p_d_DL * p_e_LE))
    return np.nansum(np.where(joint_DLE > 0, terms, 0.0), axis=(0, 2))
