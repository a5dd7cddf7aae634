"""The engine's fused layer ops (kernels/fused.py) against their op-by-op torch reference, per call.

Shapes are SmolLM2's at batch 1 (hidden 576, 9 query heads over 3 KV heads of 64, MLP 1536):
RMSNorm, residual add + RMSNorm, rotary on a fused q/k/v output, SiLU-gate, and decode attention
over 64, 300 and 1000 cached positions, twice: with the cache in the CPU caches (``paged_decode@N``),
and read from memory as in a decode step (``paged_decode@N/mem``: 30 layers' caches in turn, with
``--between-mb`` of other memory read before each call, as a step reads weights between layers), and
the causal attention of a whole prompt of 37 and 512 tokens (``paged_prefill@N``). The
implementations alternate call by call in a rotating order, so machine noise hits all alike; times
are medians.
``--baseline REV`` adds the compiled ops of an earlier commit (its ``kernels/cpu/fused_ops.cpp``), to
measure a change in the same run.

    python benchmarks/fused_ops.py [--calls 300]
    python benchmarks/fused_ops.py --baseline abb9909

Prints a table (microseconds per call, speedup), then one JSON line.
"""

from __future__ import annotations

from common import run_facts  # first: takes benchmarks/ off sys.path

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from kernels.cpu import build_extension  # noqa: E402
from kernels.fused import SOURCE, TORCH_OPS, LayerOps, compile_flags, cpu_fused_ops, ops_of  # noqa: E402

D, HQ, HK, HEAD, INTER, BLOCK, LAYERS = 576, 9, 3, 64, 1536, 16, 30
CONTEXTS = (64, 300, 1000)
PROMPTS = (37, 512)  # prefill attention: a short chat prompt, a long one


@dataclasses.dataclass
class Case:
    """One op call on fixed inputs, and what runs untimed before each call."""

    call: Callable[[LayerOps], object]
    before: Callable[[], None] = lambda: None


def cases(between_mb: float) -> dict[str, Case]:
    """Name -> one op on fixed bf16 inputs (SmolLM2's shapes, batch 1)."""
    out = {name: Case(call) for name, call in warm_calls().items()}
    for ctx in CONTEXTS:
        out[f"paged_decode@{ctx}/mem"] = paged_decode_from_memory(ctx, between_mb)
    return out


def paged_decode_from_memory(ctx: int, between_mb: float) -> Case:
    """Decode attention over ``ctx`` positions as a decode step runs it: each call reads the next of
    LAYERS layers' caches, after ``between_mb`` of a large buffer was read (the weights between layers)."""
    blocks = -(-ctx // BLOCK)
    caches = [(torch.randn(blocks, BLOCK, HK, HEAD).bfloat16(), torch.randn(blocks, BLOCK, HK, HEAD).bfloat16())
              for _ in range(LAYERS)]
    tables, lens, q = torch.arange(blocks)[None], torch.tensor([ctx]), torch.randn(1, HQ, HEAD).bfloat16()
    words = int(between_mb * 2**20) // 8
    flood = torch.ones(16 * words, dtype=torch.int64)  # 16 slices read in turn
    state = {"layer": 0, "slice": 0}

    def before() -> None:
        state["layer"] = (state["layer"] + 1) % LAYERS
        state["slice"] = (state["slice"] + 1) % 16
        flood[state["slice"] * words: (state["slice"] + 1) * words].sum()

    def call(o: LayerOps) -> object:
        k_cache, v_cache = caches[state["layer"]]
        return o.paged_decode(q, k_cache, v_cache, tables, lens, 0.125)
    return Case(call, before)


def baseline_ops(rev: str) -> LayerOps:
    """The compiled fused ops of commit ``rev`` (built once, cached like the current ones), named ``rev``."""
    repo = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:{SOURCE.relative_to(repo)}"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout
    source = Path(tempfile.mkdtemp()) / "fused_ops.cpp"
    source.write_text(text)
    ext = build_extension(f"fused_baseline_{rev}", source, compile_flags())
    if isinstance(ext, str):
        raise SystemExit(f"cannot build the ops of {rev}: {ext}")
    return ops_of(rev, ext)


def warm_calls() -> dict[str, Callable[[LayerOps], object]]:
    """Name -> a call of one op on fixed bf16 inputs, which stay in the CPU caches."""
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
    for ctx in CONTEXTS:
        tables, lens = torch.arange(-(-ctx // BLOCK))[None], torch.tensor([ctx])
        out[f"paged_decode@{ctx}"] = (lambda o, t=tables, n=lens: o.paged_decode(qd, k_cache, v_cache, t, n, 0.125))
    for rows in PROMPTS:
        qp, table = torch.randn(rows, HQ, HEAD, dtype=bf), torch.arange(-(-rows // BLOCK))
        out[f"paged_prefill@{rows}"] = (lambda o, q=qp, t=table: o.paged_prefill(q, k_cache, v_cache, t, 0, 0.125))
    return out


def measure(case: Case, impls: list[LayerOps], calls: int) -> dict[str, float]:
    """Median microseconds per call of each implementation, alternating call by call in a rotating order
    (in a fixed one, the op that ran right after the torch reference was measured 10-20% slower)."""
    times: dict[str, list[float]] = {o.name: [] for o in impls}
    for o in impls:
        case.call(o)
    for i in range(calls):
        for o in impls[i % len(impls):] + impls[:i % len(impls)]:  # rotated: who follows whom changes too
            case.before()
            start = time.perf_counter()
            case.call(o)
            times[o.name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--between-mb", type=float, default=4.0,
                   help="memory read before each /mem call (a SmolLM2 layer's weights: 2.6 MB sparse, 7 MB dense)")
    p.add_argument("--baseline", metavar="REV", help="also time the compiled ops of this commit")
    args = p.parse_args()
    fused = cpu_fused_ops()
    if fused is None:
        raise SystemExit("the fused CPU extension could not be compiled here: nothing to compare")
    impls = [TORCH_OPS, fused] + ([baseline_ops(args.baseline)] if args.baseline else [])
    results = {}
    extra = f" {args.baseline + ' us':>12} {'vs ' + args.baseline:>12}" if args.baseline else ""
    print(f"{'op':<24} {'torch us':>9} {'fused us':>9} {'speedup':>8}{extra}")
    for name, case in cases(args.between_mb).items():
        r = measure(case, impls, args.calls)
        r["speedup"] = r["torch"] / r["cpu_fused"]
        line = f"{name:<24} {r['torch']:>9.1f} {r['cpu_fused']:>9.1f} {r['speedup']:>7.2f}x"
        if args.baseline:
            r["vs_baseline"] = r[args.baseline] / r["cpu_fused"]
            line += f" {r[args.baseline]:>12.1f} {r['vs_baseline']:>11.2f}x"
        results[name] = r
        print(line)
    print(json.dumps({"benchmark": "fused_ops", "calls": args.calls, "between_mb": args.between_mb,
                      "baseline": args.baseline, "results": results, **run_facts()}))


if __name__ == "__main__":
    main()
