"""Where a batch-1 decode step goes, dense against sparse: the decoder linears, the LM head and the rest.

Builds the serving engine (``LLMEngine``, as ``sparse-serve`` runs it) on SmolLM2 dense and on the Wanda 70%
checkpoint, starts one greedy request (40 prompt tokens, ``ignore_eos``) and times decode steps. Per variant
there are two engines: one as served, one whose decoder linears (every linear but the LM head) are stubs that
return zeros of their output shape. Each round times ``--steps`` steps of each engine and ``--steps`` calls of
the LM head alone on one row, variants alternating (A, B, A, B); the table shows medians over rounds:

    linears = step - stubbed step        glue = stubbed step - LM head (attention, norms, rotary, sampling, Python)

and the rate at which the decoder linears read their weights (their bytes over their time). Stubs are Python,
so every engine here runs the Python layer loop (``SPARSE_SERVE_DECODER=python``); the compiled decoder
that serving uses by default takes the Python part of the glue off both variants
(``benchmarks/compiled_decoder.py`` measures by how much).

    python benchmarks/step_breakdown.py                                   # dense and Wanda 70%, 5 rounds
    python benchmarks/step_breakdown.py --sparse out/smollm2-135m-instruct-wanda-50 --rounds 3

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from common import run_facts, variant_checkpoints

PROMPT = list(range(100, 140))  # 40 token ids


@dataclass
class Split:
    variant: str
    step_ms: float
    stubbed_ms: float
    lm_head_ms: float
    linears_ms: float
    glue_ms: float
    linear_mb: float  # bytes the decoder linears read per step
    linear_gbps: float


def decoder_linears(model: nn.Module) -> list[nn.Module]:
    """The serving linears of the decoder (dense, prepacked or sparse), the LM head excluded."""
    from kernels.linear import PrepackedLinear, SparseLinear

    return [m for m in model.modules() if isinstance(m, (SparseLinear, PrepackedLinear)) and m is not model.lm_head]


def linear_bytes(module: nn.Module) -> int:
    """Weight bytes one batch-1 call reads: the packed sparse weight, or the dense bf16 rows."""
    packed = module.packed
    return packed.nbytes if hasattr(packed, "nbytes") else module.out_features * module.in_features * 2


def stub(module: nn.Module) -> None:
    """Replace ``module.forward`` and the engine's bound form of it (``bound()``) by one returning zeros
    [rows, out_features] (before the engine is built, which binds them), and take away its compiled form."""
    out_features = module.out_features

    def zeros(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], out_features, dtype=torch.bfloat16)
    module.forward = zeros
    module.bound = lambda: zeros
    module.native = lambda: None


class Stepper:
    """One engine on one checkpoint with a long greedy request running; ``time(n)`` is ms per decode step."""

    def __init__(self, path: Path, stubbed: bool, max_tokens: int):
        from sparse_serve.config import EngineConfig
        from sparse_serve.engine import LLMEngine
        from sparse_serve.loader import load_for_serving
        from sparse_serve.sampling_params import SamplingParams

        loaded = load_for_serving(path)
        self.model = loaded.model
        self.linears = decoder_linears(self.model)
        if stubbed:
            for module in self.linears:
                stub(module)
        self.engine = LLMEngine(self.model, [], len(PROMPT) + max_tokens + 1, EngineConfig(), torch.bfloat16)
        self.engine.add_request("r", PROMPT, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        self.engine.step()  # prefill

    def time(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.engine.step()
        return (time.perf_counter() - start) / steps * 1e3

    def time_lm_head(self, calls: int) -> float:
        head, x = self.model.lm_head, torch.randn(1, self.model.lm_head.in_features).bfloat16()
        start = time.perf_counter()
        for _ in range(calls):
            head(x)
        return (time.perf_counter() - start) / calls * 1e3


def table(splits: list[Split]) -> str:
    lines = ["variant   step ms  stubbed ms  LM head ms  linears ms  glue ms  linear MB  linear GB/s",
             "-" * 87]
    for s in splits:
        lines.append(f"{s.variant:<8} {s.step_ms:>8.2f} {s.stubbed_ms:>11.2f} {s.lm_head_ms:>11.2f} {s.linears_ms:>11.2f} "
                     f"{s.glue_ms:>8.2f} {s.linear_mb:>10.1f} {s.linear_gbps:>12.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparse", type=Path, default=None, help="sparse checkpoint (default: Wanda 70%% in the cache)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (the table shows medians)")
    p.add_argument("--steps", type=int, default=40, help="decode steps (and LM head calls) timed per round")
    args = p.parse_args()
    os.environ["SPARSE_SERVE_DECODER"] = "python"  # the stubs are Python: every engine runs the Python loop

    paths = variant_checkpoints(["dense", "sparse"], args.sparse)
    max_tokens = (args.rounds + 1) * args.steps + 8
    steppers = {(v, stubbed): Stepper(path, stubbed, max_tokens) for v, path in paths.items() for stubbed in (False, True)}
    for s in steppers.values():
        s.time(args.steps // 4)  # warm-up
    times: dict[tuple[str, str], list[float]] = {}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for v in paths:
            times.setdefault((v, "step"), []).append(steppers[v, False].time(args.steps))
            times.setdefault((v, "stubbed"), []).append(steppers[v, True].time(args.steps))
            times.setdefault((v, "head"), []).append(steppers[v, False].time_lm_head(args.steps))
    splits = []
    for v in paths:
        step, stubbed, head = (statistics.median(times[v, k]) for k in ("step", "stubbed", "head"))
        mb = sum(linear_bytes(m) for m in steppers[v, False].linears) / 1e6
        splits.append(Split(v, step, stubbed, head, step - stubbed, stubbed - head, mb, mb / max(step - stubbed, 1e-9)))
    print(table(splits))
    print(json.dumps({"benchmark": "step_breakdown", "rounds": args.rounds, "steps": args.steps,
                      "splits": [asdict(s) for s in splits],
                      "sparse_checkpoint": str(paths["sparse"]), **run_facts()}))


if __name__ == "__main__":
    main()
