"""Speed of the sparse bitmask linear against the fastest dense bf16 path, in the same process.

For every weight shape [N, K], sparsity and batch M there are two dense baselines: oneDNN's linear
with a prepacked bf16 weight (``torch.ops.mkldnn._linear_pointwise``, the fastest dense path torch
has), and the engine's dense path (``kernels.cpu.dense_linear``: the AVX-512 dense GEMV at one or two rows,
then the blocked GEMM on oneDNN's prepacked weight up to 64 rows, oneDNN above), which is what a dense model
is served with. The candidate is the kernel the registry
selects for CPU bf16 (``--kernel`` forces one). Calls alternate oneDNN, engine dense, sparse ... for
``--rounds`` rounds; each round times ``--calls`` calls of each. ``speedup`` is the median of the
per-round ratios oneDNN time / sparse time (with the 25-75% spread), ``vs best`` the same against the
faster of the two dense paths in that round.
Weights are cycled through enough copies (> ``--cache-bust-mib`` in total) that every call reads its
weight from memory, as decoding does, and (unless ``--no-huge-pages``) the sparse copies and the engine's
dense GEMV rows live in transparent huge pages as the server places them (kernels/hugepages.py); oneDNN's
prepacked weights are opaque tensors that stay in the pages oneDNN allocated. Memory per layer compares the
bytes each format holds.

    python benchmarks/kernels.py                                 # the full table (about 10 minutes)
    python benchmarks/kernels.py --shapes 4096x4096 --batches 1,8 --sparsities 0.7 --threads 1
    python benchmarks/kernels.py --decode-loop stream            # one decode loop instead of the measured choice

Prints a table, writes a plot next to --plot, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import run_facts  # first: takes this folder off sys.path, so `kernels` is the package

from kernels.bitmask import compress  # noqa: E402
from kernels.cpu import LOOPS, TUNING, DecodePlan, PrepackedDense, decode_plan, dense_linear, prepack_dense  # noqa: E402
from kernels.hugepages import place_in_huge_pages  # noqa: E402
from kernels.linear import packed_tensors  # noqa: E402
from kernels.registry import select  # noqa: E402

SHAPES = ("576x1536", "1536x576", "4096x4096", "11008x4096", "4096x11008")
BATCHES = (1, 4, 8, 16, 32, 64)
SPARSITIES = (0.5, 0.6, 0.7, 0.8)


@dataclass
class Row:
    shape: str
    sparsity: float
    batch: int
    threads: int
    kernel: str
    dense_us: float  # oneDNN prepacked
    sparse_us: float
    speedup: float  # median over rounds of oneDNN / sparse
    spread: tuple[float, float]  # 25% and 75% quantiles of the per-round ratios
    best_dense_us: float  # the faster of oneDNN and the engine's dense path, per round
    speedup_vs_best: float  # median over rounds of best dense / sparse
    dense_bytes: int
    sparse_bytes: int


def random_sparse(n: int, k: int, sparsity: float, seed: int) -> torch.Tensor:
    """A bf16 [n, k] weight with exactly int(k * sparsity) zeros per row (as the pruners leave it)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).bfloat16()
    drop = torch.rand(n, k, generator=gen).argsort(dim=1)[:, : int(k * sparsity)]
    return w.scatter_(1, drop, 0)


def clone_packed(packed):
    """An independent copy of a packed weight (same data, other memory)."""
    if hasattr(packed, "__dataclass_fields__"):
        fields = {f: getattr(packed, f) for f in packed.__dataclass_fields__}
        return type(packed)(**{f: v.clone() if isinstance(v, torch.Tensor) else v for f, v in fields.items()})
    return packed


def copies_for(nbytes: int, cache_bust_mib: int) -> int:
    return max(2, -(-cache_bust_mib * 2**20 // max(nbytes, 1)))


def time_calls(fn, weights, x, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        fn(x, weights[i % len(weights)])
    return (time.perf_counter() - start) / calls


def measure(shape: str, sparsity: float, batches: list[int], threads: int, args) -> list[Row]:
    n, k = (int(v) for v in shape.split("x"))
    weight = random_sparse(n, k, sparsity, seed=n * 31 + k)
    kernel = select("bitmask_linear", "cpu", torch.bfloat16, force=args.kernel)
    bitmask = compress(weight)
    packed = kernel.pack(bitmask)
    sparse_bytes = getattr(packed, "nbytes", bitmask.nbytes)
    dense_bytes = n * k * 2
    onednn_w = [prepack_dense(weight.clone(), decode_rows=False) for _ in range(copies_for(dense_bytes, args.cache_bust_mib))]
    engine_w = [PrepackedDense(w.weight, w.prepacked, w.shape, rows=weight.clone(), pairs=w.pairs) for w in onednn_w]
    sparse_w = [packed] + [clone_packed(packed) for _ in range(copies_for(sparse_bytes, args.cache_bust_mib) - 1)]
    if args.huge_pages:  # held until the point is measured: the arena keeps the mapping alive
        arena = place_in_huge_pages([t for w in sparse_w for t in packed_tensors(w)] + [w.rows for w in engine_w])
        if isinstance(arena, str):
            print(f"  weights stay in normal pages: {arena}", flush=True)
    rows = []
    torch.set_num_threads(threads)
    for m in batches:
        x = torch.randn(m, k).bfloat16()
        onednn_fn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w.weight, None, "none", [], "")  # noqa: E731
        dense_fn = lambda x, w: dense_linear(x, w)  # noqa: E731
        sparse_fn = lambda x, w: kernel.apply(x, w, None)  # noqa: E731
        for fn, ws in ((onednn_fn, onednn_w), (dense_fn, engine_w), (sparse_fn, sparse_w)):  # warm up, fault in
            time_calls(fn, ws, x, len(ws))
        probe = max(_probe(onednn_fn, onednn_w, x), 1e-6)
        calls = max(3, min(args.calls, int(args.budget_s / args.rounds / 3 / probe)))
        ratios, best_ratios, dense_t, best_t, sparse_t = [], [], [], [], []
        for _ in range(args.rounds):
            d = time_calls(onednn_fn, onednn_w, x, calls)
            e = time_calls(dense_fn, engine_w, x, calls)
            s = time_calls(sparse_fn, sparse_w, x, calls)
            ratios.append(d / s)
            best_ratios.append(min(d, e) / s)
            dense_t.append(d)
            best_t.append(min(d, e))
            sparse_t.append(s)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append(Row(shape, sparsity, m, threads, kernel.name, statistics.median(dense_t) * 1e6,
                        statistics.median(sparse_t) * 1e6, statistics.median(ratios), (q[0], q[2]),
                        statistics.median(best_t) * 1e6, statistics.median(best_ratios), dense_bytes, sparse_bytes))
        print(f"  {shape:>10} s={sparsity:g} M={m:<3} t={threads}: {rows[-1].speedup:.2f}x oneDNN, "
              f"{rows[-1].speedup_vs_best:.2f}x best dense", flush=True)
    return rows


def _probe(fn, ws, x) -> float:
    return time_calls(fn, ws, x, 3)


def table(rows: list[Row]) -> str:
    head = (f"{'shape NxK':>10} {'sparsity':>8} {'M':>3} {'thr':>3} {'oneDNN us':>9} {'best us':>9} {'sparse us':>9} "
            f"{'speedup':>8} {'spread':>11} {'vs best':>8} {'bytes vs dense':>14}  kernel")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.shape:>10} {r.sparsity:>8g} {r.batch:>3} {r.threads:>3} {r.dense_us:>9.1f} "
                     f"{r.best_dense_us:>9.1f} {r.sparse_us:>9.1f} {r.speedup:>7.2f}x {r.spread[0]:>5.2f}-{r.spread[1]:<5.2f} "
                     f"{r.speedup_vs_best:>7.2f}x {r.sparse_bytes / r.dense_bytes:>14.3f}  {r.kernel}")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r.threads for r in rows})
    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(len(threads), len(shapes), figsize=(3.2 * len(shapes), 3.2 * len(threads)),
                             squeeze=False, sharey=True)
    for ti, t in enumerate(threads):
        for si, shape in enumerate(shapes):
            ax = axes[ti][si]
            for s in sorted({r.sparsity for r in rows}):
                pts = [(r.batch, r.speedup) for r in rows if r.shape == shape and r.threads == t and r.sparsity == s]
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"{s:.0%}")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{shape}, {t} thread{'s' if t > 1 else ''}", fontsize=9)
            ax.set_xlabel("batch M")
    axes[0][0].set_ylabel("speedup over oneDNN dense bf16")
    axes[0][0].legend(fontsize=7, title="sparsity", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="weight shapes NxK (out x in)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--threads", default="1,2", help="thread counts to measure (both are reported)")
    p.add_argument("--rounds", type=int, default=15, help="alternating dense/sparse rounds per point")
    p.add_argument("--calls", type=int, default=50, help="most calls per round")
    p.add_argument("--budget-s", type=float, default=1.5, help="rough seconds per point (caps --calls)")
    p.add_argument("--cache-bust-mib", type=int, default=160, help="weights cycled per point, MiB")
    p.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True,
                   help="place the sparse weights and the dense GEMV rows in huge pages, as the server does")
    p.add_argument("--kernel", default=None, help="force a registered kernel (default: the selected one)")
    p.add_argument("--decode-loop", choices=["auto", *LOOPS], default="auto",
                   help="the decode loop for every pass (default: the fastest measured on this machine)")
    p.add_argument("--plot", type=Path, default=Path("benchmarks/results/kernels.png"))
    args = p.parse_args()
    if args.decode_loop != "auto":
        TUNING.decode_plan = DecodePlan.uniform(args.decode_loop)

    rows: list[Row] = []
    for threads in (int(t) for t in args.threads.split(",")):
        for shape in args.shapes.split(","):
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                rows += measure(shape, sparsity, [int(b) for b in args.batches.split(",")], threads, args)
    print(table(rows))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.plot)
    print(json.dumps({"benchmark": "kernels", "rows": [asdict(r) for r in rows], "plot": str(args.plot),
                      "decode_plan": decode_plan().names(), **run_facts()}))


if __name__ == "__main__":
    main()
