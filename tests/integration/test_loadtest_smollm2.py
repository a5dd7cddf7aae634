"""The load-test driver end to end on SmolLM2: dense vs a 70%-sparse checkpoint (magnitude-pruned here, which
made here in seconds), both served on 127.0.0.1 by real ``sparse-serve`` processes, one short bounded level.
Checks that the run directory holds the report, the plots and locust's CSV, every request succeeded with the
fixed length, and the client's numbers agree with both servers' /metrics."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from loadtests.report import LATENCY_PNG, THROUGHPUT_PNG, read_requests
from loadtests.run import DriverConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def sparse70(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 with the 70% smallest weights of every row of every decoder linear set to zero, saved dense
    (the server detects the zeros and serves those linears compressed): a sparse checkpoint in seconds."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("lt") / "smollm2-magnitude-70"
    shutil.copytree(smollm2_dir, out)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        for name, w in tensors.items():
            if ".layers." in name and name.endswith("_proj.weight"):
                k = int(w.shape[1] * 0.7)  # w: [out, in]; zero the k smallest |w| of each row
                idx = w.float().abs().topk(k, dim=1, largest=False).indices
                tensors[name] = w.scatter(1, idx, torch.zeros_like(w))
        save_file(tensors, path, metadata={"format": "pt"})
    (out / "sparse_serve_manifest.json").unlink(missing_ok=True)  # describes the dense weights
    return out


def test_driver_dense_vs_sparse_on_smollm2(smollm2_dir, sparse70, tmp_path):
    cfg = DriverConfig(variants=[f"dense={smollm2_dir}", f"sparse={sparse70}"], profile="short", concurrency=[2],
                       min_requests=4, requests_per_user=2, max_time_s=120, warmup_requests=1,
                       out=str(tmp_path / "run"))
    out = run(cfg)
    for name in ("report.md", LATENCY_PNG, THROUGHPUT_PNG, "summary.json", "run.json", "levels.json"):
        assert (out / name).is_file(), name
    for variant in ("dense", "sparse"):
        stats = {r["Name"]: r for r in csv.DictReader(open(out / "locust" / f"{variant}_c2_stats.csv"))}
        assert int(stats["time_to_first_token"]["Request Count"]) == 4
    rows = read_requests(out / "requests.csv")
    assert len(rows) == 8 and all(r["ok"] and r["output_tokens"] == 32 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checks_ok"], [c for c in summary["checks"] if not c["ok"]]
    assert [(s["variant"], s["concurrency"]) for s in summary["speedups"]] == [("sparse", 2)]
    assert summary["speedups"][0]["throughput"] > 0
