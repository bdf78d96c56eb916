"""Progress of long work (`moebench.progress`): a bar with ETA on a terminal, with log lines
printed whole above it; elsewhere nothing for work shorter than LOG_EVERY_S, and a line
with rate and ETA every LOG_EVERY_S for longer work (here the interval is made 0 s, so
that every step counts as long), in `moebench data`, `comm-replay` and `aggregate`."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moebench import progress as progress_module
from moebench.cli import app, configure_logging
from moebench.progress import progress

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[moebench\.progress\] (?P<desc>[^:]+): +(?:(?P<pct>\d+)% "
                  r"(?P<n>\d+)/(?P<total>\d+) \[\d\d:\d\d<(?:\d\d:\d\d|\?), |"
                  r"(?P<count>\d+)\w+ \[\d\d:\d\d, )")
"""A progress line: `[moebench.progress] desc:  40% 4/10 [elapsed<eta, rate]`, or without a
known total `[moebench.progress] desc: 4doc [elapsed, rate]`."""


@pytest.fixture
def not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)


@pytest.fixture
def every_step(monkeypatch: pytest.MonkeyPatch, not_a_terminal: None) -> None:
    """Every step of the work is past the interval: each one writes a line."""
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)


def lines(text: str) -> list[re.Match[str]]:
    return [m for line in text.splitlines() if (m := LINE.match(line))]


def steps(n: int, **kwargs: bool) -> None:
    """`n` steps of work under `progress`, logged by the CLI's handler (on stderr)."""
    configure_logging()
    with progress("work", "step", total=n, **kwargs) as bar:
        for _ in range(n):
            bar.update()


def test_short_work_off_a_terminal_writes_nothing(not_a_terminal: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    steps(3)
    assert capsys.readouterr().err == ""


def test_long_work_off_a_terminal_logs_count_and_eta(every_step: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    steps(3)
    found = [(m["desc"], m["n"], m["total"], m["pct"]) for m in lines(capsys.readouterr().err)]
    assert found[0] == ("work", "0", "3", "0") and found[-1] == ("work", "3", "3", "100")
    assert [n for _, n, _, _ in found] == sorted(n for _, n, _, _ in found)


@pytest.mark.parametrize("kwargs", [{"show": False}, {"lines": False}])
def test_hidden_progress_logs_nothing(every_step: None, kwargs: dict[str, bool],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`show=False` (every rank but the first), `lines=False` (work that logs its own)."""
    steps(3, **kwargs)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_and_whole_log_lines(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    configure_logging()
    with progress("work", "step", total=2) as bar:
        bar.update()
        logging.getLogger("moebench.test").info("half way")
        bar.update()
    err = capsys.readouterr().err
    assert "[moebench.test] half way" in err.replace("\r", "\n").splitlines()
    assert re.search(r"work: 100%\|.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", err)


def test_the_long_commands_log_their_progress(every_step: None, tmp_path: Path) -> None:
    """`moebench data` (loading, encoding), `comm-replay` (strategies) and `aggregate`
    (checking runs, figures) each log progress lines off a terminal."""
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n\n" * 400)
    results = tmp_path / "results"
    shutil.copytree(REPO / "results/reference/gpu_study/runs", results / "runs")
    commands = {
        "data": ["data", "--out", str(tmp_path / "data"), "--set", "data.source=file",
                 "--set", f"data.path={text}", "--set", "data.vocab_size=300"],
        "comm-replay": ["comm-replay", "--output", str(tmp_path / "replay.parquet"), "--nodes", "2",
                        "--gpus-per-node", "2", "--experts", "8", "--top-k", "2",
                        "--group-limit", "1", "--tokens-per-gpu", "16", "--bias-steps", "2"],
        "aggregate": ["aggregate", "--study", str(REPO / "configs/gpu_study.yaml"),
                      "--results", str(results), "--partial"],
    }
    done = {}
    for name, argv in commands.items():
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        done[name] = {m["desc"] for m in lines(result.output)}
    assert done == {
        "data": {"loading file", "encoding train", "encoding val"},
        "comm-replay": {"replaying on 2x2"},
        "aggregate": {"checking runs", "figures of gpu_study"},
    }
