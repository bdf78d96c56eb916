"""Seed statistics of the report: paired differences against a baseline (hand-worked and
property tests), verdict words, published-claim verdicts, the specialisation score and the
one Markdown table writer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from moebench.report.domains import domain_loads, relative_share, specialisation_bits
from moebench.report.markdown import markdown_table
from moebench.report.published import CLAIMS, SETTINGS, Claim
from moebench.report.stats import Paired, default_baseline, mean_ci95, paired, paired_table

T975_2 = stats.t.ppf(0.975, 2)


def runs_frame(values: dict[str, list[float]], metric: str = "val_ppl") -> pd.DataFrame:
    """Summary rows of one study and dataset: strategy -> value per seed (NaN = no run)."""
    rows = [
        {"study": "s", "dataset": "d", "strategy": name, "seed": seed, metric: v}
        for name, vs in values.items()
        for seed, v in enumerate(vs)
        if not math.isnan(v)
    ]
    return pd.DataFrame(rows)


def test_pairing_resolves_what_unpaired_cis_cannot() -> None:
    # Seeds shift both strategies alike (10, 11, 12); the strategy is 0.5 better in each.
    runs = runs_frame({"base": [10.0, 11.0, 12.0], "new": [9.5, 10.4, 11.6]})
    p = paired(runs, "val_ppl", "new", "base")
    assert p.n == 3 and p.lhs == pytest.approx(10.5) and p.rhs == pytest.approx(11.0)
    assert p.diff == pytest.approx(-0.5)
    assert p.ci95 == pytest.approx(T975_2 * 0.1 / math.sqrt(3))  # sd of (-.5, -.6, -.4) = 0.1
    assert p.verdict == "resolved (better)"
    # Unpaired, the two 95% CIs overlap widely (each ± 2.48).
    (m_new, h_new), (m_base, h_base) = mean_ci95([9.5, 10.4, 11.6]), mean_ci95([10, 11, 12])
    assert m_new + h_new > m_base - h_base
    assert paired(runs, "val_ppl", "base", "new").verdict == "resolved (worse)"


def test_pairs_only_common_seeds_and_says_na_below_two() -> None:
    runs = runs_frame({"base": [10.0, 11.0, math.nan], "new": [9.0, math.nan, 11.0]})
    p = paired(runs, "val_ppl", "new", "base")
    assert (p.n, p.diff) == (1, -1.0) and math.isnan(p.ci95)
    assert p.verdict == "n/a (1 pair)"
    assert paired(runs_frame({"a": [1.0], "b": [math.nan]}), "val_ppl", "a", "b").n == 0


def test_ci_holding_zero_is_not_resolved() -> None:
    runs = runs_frame({"base": [10.0, 11.0, 12.0], "new": [10.5, 10.5, 12.0]})
    p = paired(runs, "val_ppl", "new", "base")
    assert p.diff - p.ci95 < 0 < p.diff + p.ci95
    assert p.verdict == "not resolved" and p.resolved == 0
    # Identical values: zero difference with zero width is not resolved either.
    same = paired(runs_frame({"a": [1.0, 2.0], "b": [1.0, 2.0]}), "val_ppl", "a", "b")
    assert same.verdict == "not resolved"


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(st.floats(1.0, 100.0), min_size=2, max_size=6),
    noise=st.lists(st.floats(-5.0, 5.0), min_size=6, max_size=6),
    shift=st.floats(-10.0, 10.0),
)
def test_paired_properties(base: list[float], noise: list[float], shift: float) -> None:
    new = [b + e for b, e in zip(base, noise, strict=False)]
    runs = runs_frame({"base": base, "new": new})
    p = paired(runs, "val_ppl", "new", "base")
    assert p.diff == pytest.approx(p.lhs - p.rhs, abs=1e-9)
    # Swapping the two flips the sign and the verdict, not the width.
    q = paired(runs, "val_ppl", "base", "new")
    assert q.diff == pytest.approx(-p.diff, abs=1e-9)
    assert q.ci95 == pytest.approx(p.ci95, abs=1e-9) and q.resolved == -p.resolved
    # A seed effect shared by both strategies changes nothing.
    moved = runs_frame({"base": [b + shift for b in base], "new": [v + shift for v in new]})
    r = paired(moved, "val_ppl", "new", "base")
    assert r.diff == pytest.approx(p.diff, abs=1e-6) and r.ci95 == pytest.approx(p.ci95, abs=1e-6)
    # Resolved means the whole CI lies on one side of zero.
    if p.resolved:
        assert np.sign(p.diff - p.ci95) == np.sign(p.diff + p.ci95) == p.resolved


def test_paired_table_rows_and_default_baseline() -> None:
    runs = runs_frame({"aux_free": [3.0, 3.1], "none": [3.5, 3.4], "aux_loss": [3.1, 3.2]})
    for m in ("val_loss", "maxvio_global", "maxvio_batch_mean", "drop_frac"):
        runs[m] = runs["val_ppl"]
    runs["devices_per_token"] = runs["nodes_per_token"] = 1.0
    assert default_baseline(["none", "aux_loss", "aux_free"]) == "aux_free"
    assert default_baseline(["zeta", "alpha"]) == "zeta"
    pt = paired_table(runs, {"s": "aux_free"})
    assert list(dict.fromkeys(pt["strategy"])) == ["none", "aux_loss"]  # canonical order
    row = pt[(pt["strategy"] == "none") & (pt["metric"] == "val_ppl")].iloc[0]
    assert row["diff_mean"] == pytest.approx(0.4) and row["n_pairs"] == 2
    assert set(pt.loc[pt["metric"] == "nodes_per_token", "verdict"]) == {"not resolved"}


@pytest.mark.parametrize(
    ("diff", "ci95", "kind", "verdict"),
    [
        (-0.3, 0.1, "lower", "reproduced"),
        (0.3, 0.1, "lower", "contradicted"),
        (-0.05, 0.1, "lower", "not resolved"),
        (0.02, 0.03, "equal", "reproduced"),  # CI [-0.01, 0.05] inside ±0.1
        (0.08, 0.05, "equal", "not resolved"),  # CI [0.03, 0.13] crosses the margin
        (0.3, 0.1, "equal", "contradicted"),  # CI [0.2, 0.4] beyond the margin
        (-0.3, 0.1, "equal", "contradicted"),
    ],
)
def test_claim_verdicts(diff: float, ci95: float, kind: str, verdict: str) -> None:
    claim = Claim("x", kind, "val_ppl", "lf_t2_free", "lf_t2_aux", margin=0.01)
    assert claim.verdict(Paired(3, 10.0 + diff, 10.0, diff, ci95)) == verdict
    assert claim.verdict(Paired(1, 10.0, 10.0, diff, math.nan)) == "n/a (1 pair)"


def test_published_claims_name_known_settings_and_hold_on_the_published_numbers() -> None:
    for c in CLAIMS:
        lhs, rhs = SETTINGS[c.lhs].values, SETTINGS[c.rhs].values
        if c.metric in lhs and c.metric in rhs:  # the paper's own numbers satisfy the claim
            gap = lhs[c.metric] - rhs[c.metric]
            assert gap < 0 if c.kind == "lower" else abs(gap) <= c.margin * rhs[c.metric], c
    assert SETTINGS["lf_t2_aux"].values == {"val_ppl": 9.56, "maxvio_global": 0.72}
    assert SETTINGS["qiu_t1_free_b4"].values["val_ppl"] == 8.521
    assert SETTINGS["v3_seq"].values["val_loss"] == 2.258


def test_specialisation_hand_worked() -> None:
    # Domain a sends 3 of 4 assignments to expert 0, domain b 3 of 4 to expert 1.
    names, load_DLE = domain_loads({"b": [[1, 3]], "a": [[3, 1]]})
    assert names == ["a", "b"]
    np.testing.assert_allclose(relative_share(load_DLE), [[[1.5, 0.5]], [[0.5, 1.5]]])
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    np.testing.assert_allclose(specialisation_bits(load_DLE), [1 - h])
    np.testing.assert_allclose(specialisation_bits(np.array([[[4.0, 0]], [[0, 4.0]]])), [1.0])
    with pytest.raises(ValueError, match="same shape for every domain"):
        domain_loads({"a": [[1, 2]], "b": [[1, 2, 3]]})


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 8)),
    scale=st.floats(0.1, 100.0),
)
def test_specialisation_properties(seed: int, shape: tuple[int, int, int], scale: float) -> None:
    rng = np.random.default_rng(seed)
    load_DLE = rng.integers(1, 50, size=shape).astype(float)
    bits = specialisation_bits(load_DLE)
    n_d, _, n_e = shape
    assert (bits >= -1e-12).all() and (bits <= min(math.log2(n_d), math.log2(n_e)) + 1e-9).all()
    np.testing.assert_allclose(specialisation_bits(load_DLE * scale), bits, atol=1e-9)
    # Every domain spreading its load like the whole set: no specialisation.
    proportional = rng.uniform(1, 5, n_d)[:, None, None] * rng.uniform(1, 5, shape[1:])[None]
    np.testing.assert_allclose(specialisation_bits(proportional), 0.0, atol=1e-9)
    np.testing.assert_allclose(relative_share(proportional), 1.0)
    # The relative shares of a domain average to 1 under the layer's expert distribution.
    p_e_LE = load_DLE.sum(axis=0) / load_DLE.sum(axis=(0, 2))[:, None]
    np.testing.assert_allclose((relative_share(load_DLE) * p_e_LE).sum(axis=2), 1.0)


def test_markdown_table() -> None:
    text = markdown_table(["strategy", "n"], [["aux_free", "3"], ["x", "10"]])
    assert text.splitlines() == [
        "| strategy   |   n |",
        "|:-----------|----:|",
        "| aux_free   |   3 |",
        "| x          |  10 |",
    ]
    with pytest.raises(ValueError, match="one letter per column"):
        markdown_table(["a", "b"], [], "l")
