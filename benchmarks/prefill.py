"""Prompt processing (prefill) through the serving engine, against what the engine ran before.

Builds the serving engine (``LLMEngine``, as ``sparse-serve`` runs it) on SmolLM2 dense and on the Wanda 70%
checkpoint and times whole prompts of ``--prompts`` tokens (random ids, one output token, chunked by the
default 512-token step budget), each twice: with the engine as it is and with one part of it swapped for a
``--baseline``:

* ``attention``: ``paged_prefill`` (every row of a chunk a decode query over the cache up to its own position)
  swapped for the torch reference (``scaled_dot_product_attention`` on the gathered blocks);
* ``row-major``: the sparse linears past the panel GEMM decompressed row-major for a plain dense GEMM instead
  of into oneDNN's prepacked form (``kernels.cpu.blocked_weight``; dense models do not change).

Rounds alternate the two, variant by variant; the table shows medians and the per-round ratio's median
(``speedup`` = baseline time / engine time), and each variant's time against dense (``vs dense``, engine).

    python benchmarks/prefill.py                                  # 37, 512 and 2000 tokens, 3 rounds
    python benchmarks/prefill.py --baseline row-major --prompts 512,2000
    python benchmarks/prefill.py --prompts 4000 --rounds 1 --variants sparse

Prints a table, then one JSON line.
"""

from __future__ import annotations

from common import run_facts, variant_checkpoints  # first: takes benchmarks/ off sys.path

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, ContextManager, Iterator  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import kernels.cpu as cpu  # noqa: E402
from kernels.fused import LayerOps, torch_paged_prefill  # noqa: E402


@dataclasses.dataclass
class Row:
    variant: str
    prompt_tokens: int
    engine_ms: float  # median
    baseline_ms: float  # median
    speedup: float  # median of the per-round ratios baseline / engine
    vs_dense: float | None  # dense engine_ms / this engine_ms (None without a dense variant)


class Prefiller:
    """One engine; ``time(ids)`` is the ms to prefill ``ids`` and sample one token."""

    def __init__(self, path: Path, max_len: int):
        from sparse_serve.config import EngineConfig
        from sparse_serve.engine import LLMEngine
        from sparse_serve.loader import load_for_serving

        self.engine = LLMEngine(load_for_serving(path).model, [], max_len, EngineConfig(), torch.bfloat16)
        self.attention = self.engine.runner.net.attention  # per layer; each holds the layer ops it calls
        self.ops: LayerOps = self.attention[0].ops
        self.count = 0

    def time(self, ids: list[int]) -> float:
        from sparse_serve.sampling_params import SamplingParams

        self.count += 1
        self.engine.add_request(str(self.count), ids, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while self.engine.has_work():
            self.engine.step()
        return (time.perf_counter() - start) * 1e3


@contextlib.contextmanager
def torch_attention(prefiller: Prefiller) -> Iterator[None]:
    """Prompt attention through torch's ``scaled_dot_product_attention`` (before ``paged_prefill``)."""
    reference = dataclasses.replace(prefiller.ops, paged_prefill=torch_paged_prefill)
    for layer in prefiller.attention:
        layer.ops = reference
    try:
        yield
    finally:
        for layer in prefiller.attention:
            layer.ops = prefiller.ops


@contextlib.contextmanager
def row_major_linears(prefiller: Prefiller) -> Iterator[None]:
    """Sparse prompt linears decompressed row-major for a plain GEMM (before oneDNN's prepacked form)."""
    saved = cpu.TUNING.blocked_max_bytes
    cpu.TUNING.blocked_max_bytes = 0
    try:
        yield
    finally:
        cpu.TUNING.blocked_max_bytes = saved


BASELINES: dict[str, Callable[[Prefiller], ContextManager[None]]] = {
    "attention": torch_attention, "row-major": row_major_linears}


def table(rows: list[Row], baseline: str) -> str:
    lines = [f"variant  prompt  engine ms  {baseline + ' ms':>14}  speedup  vs dense", "-" * 60]
    lines += [f"{r.variant:<8} {r.prompt_tokens:>6} {r.engine_ms:>10.1f} {r.baseline_ms:>15.1f} {r.speedup:>8.2f}x"
              + (f" {r.vs_dense:>8.2f}x" if r.vs_dense is not None else "") for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", default="37,512,2000", help="comma-separated prompt lengths in tokens")
    p.add_argument("--variants", default="dense,sparse", help="comma-separated: dense, sparse")
    p.add_argument("--baseline", choices=sorted(BASELINES), default="attention",
                   help="what the engine is timed against")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (the table shows medians)")
    p.add_argument("--sparse", type=Path, default=None, help="sparse checkpoint (default: Wanda 70%% in the cache)")
    args = p.parse_args()

    lengths = [int(n) for n in args.prompts.split(",")]
    paths = variant_checkpoints(args.variants.split(","), args.sparse)
    engines = {v: Prefiller(path, max(lengths) + 8) for v, path in paths.items()}
    torch.manual_seed(0)
    prompts = {n: torch.randint(100, 40000, (n,)).tolist() for n in lengths}
    times: dict[tuple[str, int, str], list[float]] = {}
    for e in engines.values():
        e.time(prompts[lengths[0]])  # warm-up
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for v, e in engines.items():
            for n in lengths:
                times.setdefault((v, n, "engine"), []).append(e.time(prompts[n]))
                with BASELINES[args.baseline](e):
                    times.setdefault((v, n, "baseline"), []).append(e.time(prompts[n]))
    median = {key: statistics.median(ts) for key, ts in times.items()}
    rows = [Row(v, n, median[v, n, "engine"], median[v, n, "baseline"],
                statistics.median(b / e for b, e in zip(times[v, n, "baseline"], times[v, n, "engine"])),
                median["dense", n, "engine"] / median[v, n, "engine"] if "dense" in engines else None)
            for v in engines for n in lengths]
    print(table(rows, args.baseline))
    print(json.dumps({"benchmark": "prefill", "baseline": args.baseline, "rounds": args.rounds,
                      "rows": [dataclasses.asdict(r) for r in rows], **run_facts()}))


if __name__ == "__main__":
    main()
