"""Dense decode batches: the blocked GEMM on oneDNN's prepacked weight against oneDNN's own GEMM.

Two parts, each alternating its contenders round by round in one process:

* **linears** - SmolLM2's dense decoder linears (q/k/v fused, o, gate/up fused, down; all 30 layers' copies
  cycled, so every call reads its weight from memory) and the 49152 x 576 LM head, at ``--batches`` rows:
  oneDNN's prepacked linear (``torch.ops.mkldnn._linear_pointwise``) against ``dense_gemm_blocked`` reading
  the same prepacked bytes. Time per layer (the four linears) and for the head.
* **engine** - two dense SmolLM2 engines (``LLMEngine``, as ``sparse-serve --dense`` runs it), one with
  ``TUNING.blocked_gemm_max_rows = 0`` (oneDNN past the GEMV's rows, as before the blocked GEMM), one with the
  default; each decodes ``B`` greedy requests (40 prompt tokens, ``ignore_eos``) and a round times ``--steps``
  decode steps at every batch size ``B`` in ``--engine-batches``.

    python benchmarks/dense_batches.py
    python benchmarks/dense_batches.py --batches 3,8,16 --engine-batches 4,16 --rounds 9

Prints two tables (medians over rounds, ratios as medians of per-round ratios), then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from common import run_facts, variant_checkpoints  # first: takes this folder off sys.path

from kernels.cpu import TUNING, PrepackedDense, extension  # noqa: E402

PROMPT = list(range(100, 140))
LAYER_PARTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass
class Point:
    part: str  # "layer" (its four linears) or "lm_head", or "step" for the engine
    rows: int
    onednn_ms: float  # engine: the step with oneDNN past the GEMV
    blocked_ms: float  # engine: the step as served
    speedup: float  # median of per-round ratios


def onednn(x: torch.Tensor, w: PrepackedDense) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w.weight, None, "none", [], "")


def blocked(x: torch.Tensor, w: PrepackedDense) -> torch.Tensor:
    return extension().dense_gemm_blocked(x, w.weight, w.pairs, None)


def time_groups(fn: Callable, groups: list[list[PrepackedDense]], xs: list[torch.Tensor], repeats: int) -> float:
    """ms for one pass over the first group's position in every group (e.g. one layer's four linears)."""
    start = time.perf_counter()
    for _ in range(repeats):
        for group in groups:
            for w, x in zip(group, xs):
                fn(x, w)
    return (time.perf_counter() - start) / (repeats * len(groups)) * 1e3


def dense_model():
    from sparse_serve.loader import load_for_serving

    return load_for_serving(variant_checkpoints(["dense"])["dense"], argmax_screen=False).model


def linears(model, batches: list[int], rounds: int) -> list[Point]:
    layers = [[getattr(m, name) for name in LAYER_PARTS for m in (layer.self_attn, layer.mlp) if hasattr(m, name)]
              for layer in model.model.layers]
    groups = [[lin.packed for lin in layer] for layer in layers]
    head = [[model.lm_head.packed]]
    if any(w.pairs is None for g in groups + head for w in g):
        raise SystemExit("oneDNN does not prepack these weights in the blocked form here: nothing to compare")
    points = []
    for m in tqdm(batches, desc="linears"):
        for part, gs in (("layer", groups), ("lm_head", head)):
            xs = [torch.randn(m, w.shape[1]).bfloat16() for w in gs[0]]
            repeats = max(1, 30 // len(gs))
            for fn in (onednn, blocked):  # warm up
                time_groups(fn, gs, xs, 1)
            a, b = [], []
            for _ in range(rounds):
                a.append(time_groups(onednn, gs, xs, repeats))
                b.append(time_groups(blocked, gs, xs, repeats))
            points.append(Point(part, m, statistics.median(a), statistics.median(b),
                                statistics.median(x / y for x, y in zip(a, b))))
    return points


@contextlib.contextmanager
def tuning(blocked_rows: int) -> Iterator[None]:
    """``TUNING.blocked_gemm_max_rows`` set to ``blocked_rows`` for the block, then restored."""
    saved, TUNING.blocked_gemm_max_rows = TUNING.blocked_gemm_max_rows, blocked_rows
    try:
        yield
    finally:
        TUNING.blocked_gemm_max_rows = saved


class Engine:
    """A dense engine whose linears were bound with ``blocked_rows`` as ``TUNING.blocked_gemm_max_rows``."""

    def __init__(self, blocked_rows: int):
        self.blocked_rows = blocked_rows
        with tuning(blocked_rows):
            self.model = dense_model()

    def step_ms(self, batch: int, steps: int) -> float:
        from sparse_serve.config import EngineConfig
        from sparse_serve.engine import LLMEngine
        from sparse_serve.sampling_params import SamplingParams

        with tuning(self.blocked_rows):  # the Python path reads it per call
            config = EngineConfig()
            engine = LLMEngine(self.model, [], len(PROMPT) + steps + 16, config, torch.bfloat16)
            params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
            for i in range(batch):
                engine.add_request(f"r{i}", PROMPT, params)
            budget = config.scheduler.max_num_batched_tokens
            for _ in range(-(-batch * len(PROMPT) // budget) + 1):  # the prefill steps, then a first decode step
                engine.step()
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            return (time.perf_counter() - start) / steps * 1e3


def engine_steps(batches: list[int], rounds: int, steps: int) -> list[Point]:
    before, served = Engine(0), Engine(TUNING.blocked_gemm_max_rows)
    times: dict[tuple[int, int], list[float]] = {(b, i): [] for b in batches for i in range(2)}
    for r in tqdm(range(rounds), desc="engine rounds"):
        for b in batches:
            order = [(0, before), (1, served)] if r % 2 == 0 else [(1, served), (0, before)]
            for i, engine in order:
                times[b, i].append(engine.step_ms(b, steps))
    return [Point("step", b, statistics.median(times[b, 0]), statistics.median(times[b, 1]),
                  statistics.median(x / y for x, y in zip(times[b, 0], times[b, 1]))) for b in batches]


def table(points: list[Point], title: str, a: str, b: str) -> str:
    lines = [title, f"{'part':<8} {'rows':>4} {a:>12} {b:>12} {'speedup':>8}", "-" * 48]
    lines += [f"{p.part:<8} {p.rows:>4} {p.onednn_ms:>12.3f} {p.blocked_ms:>12.3f} {p.speedup:>7.2f}x" for p in points]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,2,3,4,8,16,32,64", help="rows for the linears alone")
    p.add_argument("--engine-batches", default="1,2,4,8,16", help="concurrent requests for the engine steps")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds (medians)")
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per engine, batch and round")
    args = p.parse_args()
    torch.manual_seed(0)
    lin = linears(dense_model(), [int(b) for b in args.batches.split(",")], args.rounds)
    eng = engine_steps([int(b) for b in args.engine_batches.split(",")], args.rounds, args.steps)
    print(table(lin, "SmolLM2's dense linears, weights from memory, ms", "oneDNN", "blocked"))
    print()
    print(table(eng, "dense decode step, ms (engine; GEMV at 1-2 rows either way)", "oneDNN past", "blocked"))
    print(json.dumps({"benchmark": "dense_batches", "rounds": args.rounds, "steps": args.steps,
                      "linears": [asdict(p) for p in lin], "engine": [asdict(p) for p in eng],
                      "blocked_gemm_max_rows": TUNING.blocked_gemm_max_rows, **run_facts()}))


if __name__ == "__main__":
    main()
