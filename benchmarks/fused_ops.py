"""The engine's fused layer ops (kernels/fused.py) against their op-by-op torch reference, per call.

Shapes are SmolLM2's at batch 1 (hidden 576, 9 query heads over 3 KV heads of 64, MLP 1536):
RMSNorm, residual add + RMSNorm, rotary on a fused q/k/v output, SiLU-gate, and decode attention
over 64, 300 and 1000 cached positions. The two implementations alternate call by call, so machine
noise hits both alike; times are medians.

    python benchmarks/fused_ops.py [--calls 300]

Prints a table (microseconds per call, speedup), then one JSON line.
"""

from __future__ import annotations

from common import run_facts  # first: takes benchmarks/ off sys.path

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from kernels.fused import TORCH_OPS, LayerOps, cpu_fused_ops  # noqa: E402

D, HQ, HK, HEAD, INTER, BLOCK = 576, 9, 3, 64, 1536, 16


def cases() -> dict[str, Callable[[LayerOps], object]]:
    """Name -> a call of one op on fixed bf16 inputs."""
    bf = torch.bfloat16
    x, w, delta = torch.randn(1, D, dtype=bf), torch.randn(D, dtype=bf), torch.randn(1, D, dtype=bf)
    qkv = torch.randn(1, HQ + 2 * HK, HEAD, dtype=bf)
    q, k, v = qkv.split([HQ, HK, HK], dim=1)
    cos, sin = torch.randn(1, HEAD, dtype=bf), torch.randn(1, HEAD, dtype=bf)
    gate_up = torch.randn(1, 2 * INTER, dtype=bf)
    out = {"rms_norm": lambda o: o.rms_norm(x, w, 1e-5),
           "add_rms_norm_": lambda o: o.add_rms_norm_(x.clone(), delta, w, 1e-5),
           "rotary_": lambda o: o.rotary_(q, k, cos, sin),
           "silu_mul": lambda o: o.silu_mul(gate_up)}
    k_cache = torch.randn(1000 // BLOCK + 1, BLOCK, HK, HEAD, dtype=bf)
    v_cache = torch.randn_like(k_cache)
    out["rotary_cache_"] = lambda o: o.rotary_cache_(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([70]))
    qd = torch.randn(1, HQ, HEAD, dtype=bf)
    for ctx in (64, 300, 1000):
        tables, lens = torch.arange(-(-ctx // BLOCK))[None], torch.tensor([ctx])
        out[f"paged_decode@{ctx}"] = (lambda o, t=tables, n=lens: o.paged_decode(qd, k_cache, v_cache, t, n, 0.125))
    return out


def measure(fn: Callable[[LayerOps], object], impls: list[LayerOps], calls: int) -> dict[str, float]:
    """Median microseconds per call of each implementation, alternating call by call."""
    times: dict[str, list[float]] = {o.name: [] for o in impls}
    for o in impls:
        fn(o)
    for _ in range(calls):
        for o in impls:
            start = time.perf_counter()
            fn(o)
            times[o.name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    fused = cpu_fused_ops()
    if fused is None:
        raise SystemExit("the fused CPU extension could not be compiled here: nothing to compare")
    results = {}
    print(f"{'op':<20} {'torch us':>9} {'fused us':>9} {'speedup':>8}")
    for name, fn in cases().items():
        r = measure(fn, [TORCH_OPS, fused], args.calls)
        r["speedup"] = r["torch"] / r["cpu_fused"]
        results[name] = r
        print(f"{name:<20} {r['torch']:>9.1f} {r['cpu_fused']:>9.1f} {r['speedup']:>7.2f}x")
    print(json.dumps({"benchmark": "fused_ops", "calls": args.calls, "results": results, **run_facts()}))


if __name__ == "__main__":
    main()
