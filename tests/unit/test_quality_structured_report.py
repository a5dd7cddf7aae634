"""The structured-pruning benchmark reports from its rows file without computing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_structured.py"


def test_report_from_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    common = {"windows": 4, "prune_seconds": 10.0, "zeroshot_avg": 0.5, "params_before": 1000}
    records = [
        {**common, "row": "dense", "ppl": 20.0, "prune_seconds": 0.0},
        {**common, "row": "wanda-sp:0.5", "ppl": 300.0, "achieved_ratio": 0.5, "params_after": 500},
        {**common, "row": "flap:0.5", "ppl": 100.0, "achieved_ratio": 0.499, "params_after": 501},
        {"kind": "speed", "results": {
            "dense": {"engine_tok_s": 20.0, "hf_tok_s": 10.0, "engine_speedup": 1.0, "hf_speedup": 1.0},
            "flap:0.5": {"engine_tok_s": 36.0, "hf_tok_s": 16.0, "engine_speedup": 1.8, "hf_speedup": 1.6}}},
    ]
    rows.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = subprocess.run([sys.executable, str(SCRIPT), "--report", "--rows", str(rows), "--windows", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flap = next(line for line in out.stdout.splitlines() if line.startswith("FLAP "))
    assert "5.00x" in flap and "1.80x" in flap and "1.60x" in flap and "0.499" in flap
    assert any(line.startswith("Wanda-sp") and "15.00x" in line for line in out.stdout.splitlines())
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["benchmark"] == "quality_structured" and final["speed"]["flap:0.5"]["engine_speedup"] == 1.8
    assert rows.with_suffix(".png").is_file()


def test_report_of_speed_rows_alone(tmp_path):
    """Rows timed with --speed before (or without) their quality evaluation still get a table row."""
    rows = tmp_path / "rows.jsonl"
    speed = {"kind": "speed", "results": {
        "dense": {"engine_tok_s": 80.0, "hf_tok_s": 18.0, "engine_speedup": 1.0, "hf_speedup": 1.0},
        "flap:0.5": {"engine_tok_s": 124.0, "hf_tok_s": 21.6, "engine_speedup": 1.55, "hf_speedup": 1.2,
                     "rounds": 10, "decode_tokens": 64}}}
    rows.write_text(json.dumps(speed) + "\n")
    out = subprocess.run([sys.executable, str(SCRIPT), "--report", "--rows", str(rows), "--windows", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "UserWarning" not in out.stderr
    flap = next(line for line in out.stdout.splitlines() if line.startswith("FLAP "))
    assert "124.0" in flap and "1.55x" in flap and "1.20x" in flap
    assert "(64 tokens, median of 10 interleaved rounds)" in out.stdout  # as measured, not the flag defaults


def test_speed_names_the_rows_without_a_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--speed", "--only", "flap:0.5", "--rows",
                          str(tmp_path / "rows.jsonl"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "flap:0.5" in out.stderr and "without --speed" in out.stderr
