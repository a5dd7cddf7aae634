"""The exponent-coded LM head (kernels/exponent_coding.py): the kernel alone, then decode steps through the engine.

SmolLM2's LM head (its tied embedding, 49152 x 576 bf16) takes 14 high bytes (sign and top exponent bits), so it
is coded losslessly in 12 bits a weight. Part one times one activation row through it, weights from memory
(a 64 MiB buffer written before every call), three ways, order rotating per round: oneDNN's prepacked linear
(the dense baseline of benchmarks/kernels.py), the plain decode GEMV (``dense_gemm_decode``) and the coded one
(``coded_gemm_decode``).
Part two builds the serving engine (``LLMEngine``, as ``sparse-serve`` runs it) on SmolLM2 dense and on the
Wanda 70% checkpoint, each with the LM head coded and plain (``CpuTuning.code_exponents``), and times
64-token greedy decodes (40 prompt tokens, ``ignore_eos``), the four engines alternating; the ratios are
medians of per-round ratios.

    python benchmarks/lm_head.py                   # 40 kernel rounds, 12 engine rounds
    python benchmarks/lm_head.py --engine-rounds 0 # the kernel only

Prints two tables, then one JSON line.
"""

from __future__ import annotations

from common import run_facts, variant_checkpoints  # first: takes benchmarks/ off sys.path

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import kernels.cpu as cpu  # noqa: E402
from kernels.exponent_coding import code_exponents  # noqa: E402

FLUSH_BYTES = 64 << 20


def head_weight(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return model.get_output_embeddings().weight.detach().contiguous()


def kernel_times(weight: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """ms per call of each way, one row, weights from memory."""
    coded = code_exponents(weight)
    if coded is None:
        raise SystemExit("this LM head takes more than 16 exponents: it is not coded")
    ext = cpu.extension()
    onednn = torch.ops.mkldnn._reorder_linear_weight(weight)
    x = torch.randn(1, weight.shape[1]).bfloat16()
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""),
        "plain GEMV": lambda: ext.dense_gemm_decode(x, weight, None),
        "coded GEMV": lambda: ext.coded_gemm_decode(x, coded.low, coded.codes, coded.table, None),
    }
    assert torch.equal(ways["plain GEMV"](), ways["coded GEMV"]())
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8)
    times: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for r in tqdm(range(rounds), desc="kernel rounds"):
        for name in names[r % 3:] + names[:r % 3]:
            flush.fill_(r)
            start = time.perf_counter()
            ways[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def decode_tpot(engine, count: int) -> float:
    """ms per output token of one 64-token greedy decode (the first step, the prompt's, excluded)."""
    from sparse_serve.sampling_params import SamplingParams

    engine.add_request(f"r{count}", list(range(100, 140)), SamplingParams(max_tokens=64, temperature=0.0,
                                                                          ignore_eos=True))
    engine.step()
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    return (time.perf_counter() - start) * 1e3 / 63


def engine_times(paths: dict[str, Path], rounds: int) -> dict[tuple[str, bool], list[float]]:
    from sparse_serve.config import EngineConfig
    from sparse_serve.engine import LLMEngine
    from sparse_serve.loader import load_for_serving

    engines = {}
    for coded in (False, True):
        cpu.TUNING.code_exponents = coded
        for variant, path in paths.items():
            engines[variant, coded] = LLMEngine(load_for_serving(path).model, [], 256, EngineConfig(), torch.bfloat16)
    cpu.TUNING.code_exponents = True
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in engines}
    keys = list(engines)
    for r in tqdm(range(rounds), desc="engine rounds"):
        for key in keys if r % 2 == 0 else keys[::-1]:
            times[key].append(decode_tpot(engines[key], r))
    return times


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40, help="kernel rounds (each way once per round)")
    p.add_argument("--engine-rounds", type=int, default=12, help="engine rounds (0: the kernel only)")
    p.add_argument("--sparse", type=Path, default=None, help="sparse checkpoint (default: Wanda 70%% in the cache)")
    args = p.parse_args()
    if not cpu.avx512_available():
        raise SystemExit(f"the coded GEMV needs the AVX-512 kernels: {cpu.avx512_unavailable_reason()}")

    paths = variant_checkpoints(["dense", "sparse"] if args.engine_rounds else ["dense"], args.sparse)
    weight = head_weight(paths["dense"])
    kt = kernel_times(weight, args.rounds)
    coded = code_exponents(weight)
    high_bytes = int(((weight.view(torch.int16) >> 8) & 0xFF).unique().numel())
    print(f"LM head {tuple(weight.shape)}: {weight.numel() * 2 / 1e6:.1f} MB bf16, {coded.nbytes / 1e6:.1f} MB coded "
          f"({coded.nbytes / (weight.numel() * 2):.2f}x), {high_bytes} distinct high bytes")
    print("way          ms (median)  vs oneDNN  vs plain GEMV")
    print("-" * 49)
    for name, t in kt.items():
        print(f"{name:<12} {statistics.median(t):>11.3f} {ratio(kt['oneDNN'], t):>9.2f}x "
              f"{ratio(kt['plain GEMV'], t):>13.2f}x")
    result = {"benchmark": "lm_head", "rounds": args.rounds, "shape": list(weight.shape),
              "bytes": {"bf16": weight.numel() * 2, "coded": coded.nbytes},
              "kernel_ms": {k: statistics.median(v) for k, v in kt.items()},
              "coded_vs_plain_gemv": ratio(kt["plain GEMV"], kt["coded GEMV"]),
              "coded_vs_onednn": ratio(kt["oneDNN"], kt["coded GEMV"])}
    if args.engine_rounds:
        et = engine_times(paths, args.engine_rounds)
        print("\nvariant  LM head  TPOT ms (median)  coded / plain speedup")
        print("-" * 54)
        for (variant, coded_head), t in et.items():
            speedup = f"{ratio(et[variant, False], t):.3f}x" if coded_head else ""
            print(f"{variant:<8} {'coded' if coded_head else 'plain':<7} {statistics.median(t):>17.2f}  {speedup}")
        vs_dense = {("coded" if c else "plain"): ratio(et["dense", c], et["sparse", c]) for c in (False, True)}
        print("sparse / dense tokens/s: " + ", ".join(f"{k} head {v:.3f}x" for k, v in vs_dense.items()))
        result.update({"engine_rounds": args.engine_rounds,
                       "tpot_ms": {f"{v}/{'coded' if c else 'plain'}": statistics.median(t)
                                   for (v, c), t in et.items()},
                       "coded_speedup": {v: ratio(et[v, False], et[v, True]) for v in paths},
                       "sparse_vs_dense": vs_dense, "sparse_checkpoint": str(paths["sparse"])})
    print(json.dumps({**result, **run_facts()}))


if __name__ == "__main__":
    main()
