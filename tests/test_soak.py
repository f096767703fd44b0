"""The soak benchmark (``benchmarks/soak.py``): its referee, and a tiny run end to end.

The referee's functions are checked on made-up records first (it must catch an excess of
one, and must not count a window boundary or a hand-over as one), then the whole soak runs
at a tiny size (2 processes x 8 tasks x 3 s) as ``make soak`` would, on its own
redis-server, and its verdict and report are read back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.soak import KEYS, LIMITS, MIX, overlap, referee, window_use

ROOT = Path(__file__).resolve().parent.parent
S = 1_000_000  # microseconds per second


def record(
    api: str, at_us: int, hold_us: int = 1000, *, key: int = -1, cost: int = 1, tokens: int = 0
) -> tuple[int, ...]:
    """One holder's record: called 100 µs before admission, returned 100 µs after it."""
    actual = tokens if tokens else -1
    t_call, t_acq, t_rel = (at_us - 100) * 1000, (at_us + 100) * 1000, (at_us + hold_us) * 1000
    return (MIX.index(api), key, t_call, t_acq, t_rel, at_us, cost, tokens, actual, 0)


def failed(records: list[tuple[int, ...]]) -> list[str]:
    return [c.name for c in referee(records, 10.0).checks if not c.ok]


def test_overlap_counts_touching_intervals_once() -> None:
    """An interval that starts when another ends is not in flight with it."""
    res = overlap([(0, 10), (10, 20), (20, 30)], limit=1)
    assert (res.peak, res.excess) == (1, [])


def test_overlap_reports_every_start_over_the_limit() -> None:
    """Three intervals sharing an instant against a limit of 2 give one excess start."""
    res = overlap([(0, 10), (1, 10), (2, 10)], limit=2)
    assert (res.peak, res.excess) == (3, [(2, 3)])


def test_window_use_allows_limit_admissions_per_period() -> None:
    """``limit`` admissions in a period, the next exactly one period later: no excess."""
    points = [(0, 1), (500, 1), (1000, 1)]
    res = window_use(points, limit=2, period=1000, end=10_000)
    assert (res.most, res.excess) == (2, [])


def test_window_use_catches_one_admission_too_many() -> None:
    """``limit + 1`` admissions within one period (by one microsecond) are an excess."""
    res = window_use([(0, 1), (500, 1), (999, 1)], limit=2, period=1000, end=10_000)
    assert (res.most, res.excess) == (3, [(0, 3)])


def test_window_use_weighs_cost() -> None:
    """A request of cost 2 counts twice in the window."""
    res = window_use([(0, 2), (10, 1)], limit=2, period=1000, end=10_000)
    assert res.excess == [(0, 3)]


def test_referee_passes_records_within_every_limit() -> None:
    """Admissions that respect every limit of the mix pass every check."""
    recs = [record("conc", i * 2000) for i in range(100)]
    recs += [record("window", i * 10_000) for i in range(300)]
    recs += [record("tokens", i * 40_000, tokens=1000) for i in range(30)]
    recs += [record("keyed", i * 30_000, key=k) for k in range(len(KEYS)) for i in range(40)]
    assert failed(recs) == []


def test_referee_catches_one_holder_too_many() -> None:
    """max_concurrent + 1 holders at one instant fail the in-flight check of that API."""
    n = LIMITS["conc"].max_concurrent
    assert n is not None
    recs = [record("conc", 1000 + i, hold_us=S) for i in range(n + 1)]
    assert failed(recs) == ["limit: conc: most in flight at one instant"]


def test_referee_checks_per_key_limits_per_key() -> None:
    """Five holders of one key fail that key's check only; spread over keys they pass."""
    recs = [record("keyed", 1000 + i, hold_us=S, key=i % len(KEYS)) for i in range(5)]
    assert failed(recs) == []
    recs = [record("keyed", 1000 + i, hold_us=S, key=2) for i in range(5)]
    assert failed(recs) == [f"limit: keyed key={KEYS[2]}: most in flight at one instant"]


def test_referee_uses_the_period_without_the_margin() -> None:
    """301 admissions spanning exactly 1 s pass 300 per 1 s (no margin added); 1 µs less fails."""
    spaced = [record("window", i * S // 300) for i in range(301)]
    assert failed(spaced) == []
    packed = [record("window", i * (S - 1) // 300) for i in range(301)]
    assert failed(packed) == [
        "limit: window: most admissions (cost-weighted) in any 1 s window starting at an admission"
    ]


def test_referee_catches_tokens_over_the_minute() -> None:
    """Charged tokens above tokens_per_minute within 60 s fail the token check."""
    tpm = LIMITS["tokens"].tokens_per_minute
    assert tpm is not None
    recs = [record("tokens", i * 2 * S, tokens=tpm // 20 + 1) for i in range(20)]
    assert failed(recs) == [
        "limit: tokens: most tokens (as charged after reconciliation) in any 60 s window "
        "starting at an admission"
    ]


def test_referee_catches_an_admission_time_outside_its_acquire() -> None:
    """An ``acquired_at`` 2 ms after ``acquire`` returned is flagged."""
    api, key, t_call, t_acq, t_rel, at, *rest = record("conc", 10 * S)
    recs = [(api, key, t_call, t_acq, t_rel, at + 2100, *rest)]
    assert failed(recs) == ["conc: acquired_at outside [acquire called, acquire returned] ± 1 ms"]


@pytest.mark.redis
@pytest.mark.multiprocess
def test_tiny_soak_passes_the_referee(tmp_path: Path) -> None:
    """2 processes x 8 tasks x 3 s on every API: no excess, the required checks pass, a report."""
    out, summary = tmp_path / "soak.md", tmp_path / "soak.json"
    args = ["--processes", "2", "--tasks", "8", "--seconds", "3", "--skip-expiry"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", *args, "--out", str(out), "--json", str(summary)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = json.loads(summary.read_text())
    # LimiterUnavailable (a worker stalled past the 0.5 s socket timeout on a loaded machine)
    # is reported, not required; every other check must pass.
    assert [c for c in found["checks"] if c["required"] and not c["ok"]] == []
    assert (found["ok"], found["excess"]) == (True, 0)
    assert all(found["admissions"][api] > 0 for api in MIX), found["admissions"]
    kinds = " ".join(found["outcomes"])
    assert "short timeout" in kinds, kinds
    assert "cancelled unless admitted" in kinds, kinds
    assert not [k for k in found["outcomes"] if "LeaseLost" in k]
    assert found["keys_after_run"] > 0
    text = out.read_text()
    assert "**Verdict: PASS**" in text
    assert "| redis-py | " in text
    assert text.strip() in proc.stdout
