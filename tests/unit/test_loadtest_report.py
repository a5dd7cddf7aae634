"""The load-test report on a recorded run (tests/data/loadtest_run: the tiny model dense vs 70% magnitude
sparse, recorded with ``python -m loadtests.run``): statistics recomputed independently, goodput under
other SLOs, speedups, the /metrics cross-check (and that it catches a mismatch), the files written."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from loadtests import report as R

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "loadtest_run"


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    return out


def fixture_rows(variant: str, concurrency: int) -> list[dict]:
    return [r for r in R.read_requests(FIXTURE / "requests.csv")
            if r["variant"] == variant and r["concurrency"] == concurrency]


def test_statistics_match_an_independent_computation():
    report = R.build_report(FIXTURE)
    assert [(s.variant, s.concurrency) for s in report.stats] == [
        ("dense", 1), ("dense", 2), ("dense", 4), ("sparse", 1), ("sparse", 2), ("sparse", 4)]
    for s in report.stats:
        rows = fixture_rows(s.variant, s.concurrency)
        assert s.requests == len(rows) and s.failed == 0
        ttft = sorted(r["ttft_ms"] for r in rows)
        assert s.ttft_ms[50] == pytest.approx(statistics.median(ttft))
        assert s.ttft_ms[99] <= max(ttft) and s.ttft_ms[90] >= s.ttft_ms[50]
        assert s.tpot_ms[50] == pytest.approx(statistics.median(r["tpot_ms"] for r in rows))
        wall = max(r["start_unix"] + r["e2e_ms"] / 1000 for r in rows) - min(r["start_unix"] for r in rows)
        assert s.wall_s == pytest.approx(wall)
        assert s.tok_per_s == pytest.approx(sum(r["output_tokens"] for r in rows) / wall)
        assert s.req_per_s == pytest.approx(len(rows) / wall)
        assert s.goodput_req_per_s <= s.req_per_s + 1e-9
        gaps = [g for r in rows for g in r["itl_ms"]]
        assert s.itl_mean_ms == pytest.approx(np.mean(gaps))


def test_goodput_follows_the_slos(run_dir):
    run = json.loads((run_dir / "run.json").read_text())
    rows = fixture_rows("dense", 4)
    ttft_cut = statistics.median(r["ttft_ms"] for r in rows)
    run["slo"] = {"ttft_ms": ttft_cut, "tpot_ms": 1e9}
    (run_dir / "run.json").write_text(json.dumps(run))
    s = next(s for s in R.build_report(run_dir).stats if (s.variant, s.concurrency) == ("dense", 4))
    expected = sum(r["ttft_ms"] <= ttft_cut for r in rows)
    assert s.goodput_frac == pytest.approx(expected / len(rows)) and 0 < s.goodput_frac < 1
    assert s.goodput_req_per_s == pytest.approx(expected / s.wall_s)
    run["slo"] = {"ttft_ms": 1e9, "tpot_ms": 1e-3}  # nobody meets the TPOT target
    (run_dir / "run.json").write_text(json.dumps(run))
    assert all(s.goodput_req_per_s == 0 for s in R.build_report(run_dir).stats)


def test_speedups_are_ratios_to_the_baseline_at_the_same_concurrency():
    report = R.build_report(FIXTURE)
    by = {(s.variant, s.concurrency): s for s in report.stats}
    assert [(r["variant"], r["concurrency"]) for r in report.speedups] == [("sparse", 1), ("sparse", 2), ("sparse", 4)]
    for r in report.speedups:
        d, s = by[("dense", r["concurrency"])], by[("sparse", r["concurrency"])]
        assert r["throughput"] == pytest.approx(s.tok_per_s / d.tok_per_s)
        assert r["tpot_p50"] == pytest.approx(d.tpot_ms[50] / s.tpot_ms[50])  # above 1: sparse is faster
        assert r["ttft_p50"] == pytest.approx(d.ttft_ms[50] / s.ttft_ms[50])


def test_cross_check_passes_on_the_recording_and_catches_a_mismatch(run_dir):
    report = R.build_report(FIXTURE)
    assert report.checks_ok and len(report.checks) == 6 * 5
    levels = json.loads((run_dir / "levels.json").read_text())
    levels[2]["server"]["generation_tokens"] += 1  # a token the client never saw
    levels[4]["server"]["ttft_mean_s"] *= 10  # a server TTFT far from the client's
    (run_dir / "levels.json").write_text(json.dumps(levels))
    bad = [c for c in R.build_report(run_dir).checks if not c.ok]
    assert {(c.variant, c.concurrency, c.quantity) for c in bad} == {
        (levels[2]["variant"], levels[2]["concurrency"], "generated tokens"),
        (levels[4]["variant"], levels[4]["concurrency"], "mean TTFT (ms)")}


def test_write_report_writes_markdown_plots_and_json(run_dir):
    report = R.write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "| variant | conc | reqs | TTFT p50 / p90 / p99 (ms) |" in md
    assert f"![latency vs concurrency]({R.LATENCY_PNG})" in md and "all within tolerance" in md
    assert md.count("| sparse |") == 3 + 3 + 3 * 5  # results, speedups, cross-check rows
    for name in (R.LATENCY_PNG, R.THROUGHPUT_PNG):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checks_ok"] is True and len(summary["levels"]) == len(report.stats) == 6


def test_cli_prints_tables_and_a_final_json_line(run_dir, capsys):
    assert R.main([str(run_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["report"] == "loadtest"
    assert any(line.startswith("| sparse | 4 |") for line in out)
