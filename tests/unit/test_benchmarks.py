"""The benchmark scripts start (imports resolve even though one of them is called kernels.py) and the
quality benchmark reports from its rows file without computing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_starts(script):
    out = run(str(script), "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout


def test_quality_report_from_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    facts = {"windows": 4, "prune_seconds": 1.0}
    rows.write_text("\n".join(json.dumps({**facts, **r}) for r in [
        {"row": "dense", "ppl": 20.0, "prune_seconds": 0.0},
        {"row": "wanda:uniform:0.7", "ppl": 800.0},
        {"row": "wanda:atp:0.7", "ppl": 280.0, "beta": 0.01},
    ]) + "\n")
    out = run(str(BENCHMARKS / "quality_unstructured.py"), "--report", "--rows", str(rows), "--windows", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    atp = next(line for line in out.stdout.splitlines() if line.startswith("wanda") and "atp" in line)
    assert "14.00x" in atp and "0.35x" in atp and "0.010" in atp  # vs dense, vs uniform, beta
    assert rows.with_suffix(".png").is_file()
