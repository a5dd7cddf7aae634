"""Prompt processing (prefill) through the serving engine: the compiled prefill attention against torch's.

Builds the serving engine (``LLMEngine``, as ``sparse-serve`` runs it) on SmolLM2 dense and on the Wanda 70%
checkpoint and times whole prompts of ``--prompts`` tokens (random ids, one output token, chunked by the
default 512-token step budget), each twice: with the engine's attention ops as they are (``paged_prefill``:
every row of a chunk is a decode query over the cache up to its own position) and with ``paged_prefill``
swapped for the torch reference (``scaled_dot_product_attention`` on the gathered blocks, what the engine ran
before). Rounds alternate the two, variant by variant; the table shows medians and the per-round ratio's
median (``speedup`` = reference time / compiled time).

    python benchmarks/prefill.py                                  # 37, 512 and 2000 tokens, 3 rounds
    python benchmarks/prefill.py --prompts 4000 --rounds 1 --variants sparse

Prints a table, then one JSON line.
"""

from __future__ import annotations

from common import run_facts, variant_checkpoints  # first: takes benchmarks/ off sys.path

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels.fused import LayerOps, torch_paged_prefill  # noqa: E402


@dataclasses.dataclass
class Row:
    variant: str
    prompt_tokens: int
    compiled_ms: float  # median
    reference_ms: float  # median
    speedup: float  # median of the per-round ratios reference / compiled


class Prefiller:
    """One engine; ``time(ids, ops)`` is the ms to prefill ``ids`` and sample one token with ``ops``."""

    def __init__(self, path: Path, max_len: int):
        from sparse_serve.config import EngineConfig
        from sparse_serve.engine import LLMEngine
        from sparse_serve.loader import load_for_serving

        self.engine = LLMEngine(load_for_serving(path).model, [], max_len, EngineConfig(), torch.bfloat16)
        self.attention = self.engine.runner.net.attention  # per layer; each holds the layer ops it calls
        self.ops: LayerOps = self.attention[0].ops
        self.reference = dataclasses.replace(self.ops, paged_prefill=torch_paged_prefill)  # what ran before
        self.count = 0

    def time(self, ids: list[int], ops: LayerOps) -> float:
        from sparse_serve.sampling_params import SamplingParams

        for layer in self.attention:
            layer.ops = ops
        self.count += 1
        self.engine.add_request(str(self.count), ids, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while self.engine.has_work():
            self.engine.step()
        return (time.perf_counter() - start) * 1e3


def table(rows: list[Row]) -> str:
    lines = ["variant  prompt  compiled ms  reference ms  speedup", "-" * 51]
    lines += [f"{r.variant:<8} {r.prompt_tokens:>6} {r.compiled_ms:>12.1f} {r.reference_ms:>13.1f} {r.speedup:>7.2f}x"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", default="37,512,2000", help="comma-separated prompt lengths in tokens")
    p.add_argument("--variants", default="dense,sparse", help="comma-separated: dense, sparse")
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
        e.time(prompts[lengths[0]], e.ops)  # warm-up
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for v, e in engines.items():
            for n in lengths:
                for name, ops in (("compiled", e.ops), ("reference", e.reference)):
                    times.setdefault((v, n, name), []).append(e.time(prompts[n], ops))
    rows = [Row(v, n, statistics.median(times[v, n, "compiled"]), statistics.median(times[v, n, "reference"]),
                statistics.median(r / c for r, c in zip(times[v, n, "reference"], times[v, n, "compiled"])))
            for v in engines for n in lengths]
    print(table(rows))
    print(json.dumps({"benchmark": "prefill", "rounds": args.rounds, "rows": [dataclasses.asdict(r) for r in rows],
                      **run_facts()}))


if __name__ == "__main__":
    main()
