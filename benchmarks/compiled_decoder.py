"""The compiled decoder stack against the Python layer loop: batch-1 decode steps through the serving engine.

Builds the engine (``LLMEngine``, as ``sparse-serve`` runs it) twice per checkpoint - once with
``SPARSE_SERVE_DECODER=compiled`` (the default: every layer of a decode step in one call of
``kernels/cpu/decoder.cpp``) and once with ``python`` (the same kernels called layer by layer from
Python) - on SmolLM2 dense, the Wanda 70% checkpoint and, when it exists, the FLAP 50% checkpoint
``benchmarks/quality_structured.py`` saves. Each engine decodes one greedy request (40 prompt tokens,
``ignore_eos``); every round times ``--steps`` steps of every engine in turn; the table shows medians
over rounds, the compiled decoder's speedup, and each variant's step ratio to dense under either decoder.

    python benchmarks/compiled_decoder.py --rounds 9
    python benchmarks/compiled_decoder.py --flap out/flap-50 --rounds 5

Prints a table, then one JSON line.
"""

from __future__ import annotations

import step_breakdown  # noqa: I001 - first: it imports common, which takes this folder off sys.path

import argparse
import json
import os
import statistics
from pathlib import Path

from tqdm import tqdm

from common import run_facts, variant_checkpoints
from compress.assets import cache_dir

DECODERS = ("python", "compiled")


def default_flap() -> Path | None:
    """The FLAP 50% checkpoint of benchmarks/quality_structured.py's default --work, if it was built."""
    path = cache_dir() / "bench" / "structured" / "checkpoints" / "flap-0.5"
    return path if (path / "config.json").is_file() else None


def stepper(path: Path, decoder: str, max_tokens: int) -> step_breakdown.Stepper:
    """An engine on ``path`` with the decoder ``decoder``, its request prefilled."""
    os.environ["SPARSE_SERVE_DECODER"] = decoder  # read when the engine's model is built
    s = step_breakdown.Stepper(path, False, max_tokens)
    if (s.engine.runner.net.compiled is not None) != (decoder == "compiled"):
        raise SystemExit(f"{path}: the compiled decoder is not available here (no AVX-512 BF16 kernels, or a "
                         f"layer without a compiled form), so there is nothing to compare")
    return s


def table(med: dict[tuple[str, str], float]) -> str:
    variants = list(dict.fromkeys(v for v, _ in med))
    lines = ["variant   python ms  compiled ms  speedup  vs dense (python)  vs dense (compiled)", "-" * 80]
    for v in variants:
        py, cc = med[v, "python"], med[v, "compiled"]
        lines.append(f"{v:<8} {py:>10.2f} {cc:>12.2f} {py / cc:>7.2f}x {med['dense', 'python'] / py:>17.2f}x "
                     f"{med['dense', 'compiled'] / cc:>19.2f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparse", type=Path, default=None, help="sparse checkpoint (default: Wanda 70%% in the cache)")
    p.add_argument("--flap", type=Path, default=None,
                   help="structured checkpoint (default: quality_structured.py's FLAP 50%%, if built)")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds (the table shows medians)")
    p.add_argument("--steps", type=int, default=30, help="decode steps timed per engine and round")
    args = p.parse_args()

    paths = variant_checkpoints(["dense", "sparse"], args.sparse)
    flap = args.flap or default_flap()
    if flap is not None:
        paths["flap"] = flap
    max_tokens = (args.rounds + 1) * args.steps + 8
    engines = {(v, d): stepper(path, d, max_tokens) for v, path in paths.items() for d in DECODERS}
    for s in engines.values():
        s.time(args.steps // 4)  # warm-up
    times: dict[tuple[str, str], list[float]] = {key: [] for key in engines}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for key, s in engines.items():
            times[key].append(s.time(args.steps))
    med = {key: statistics.median(t) for key, t in times.items()}
    print(table(med))
    print(json.dumps({"benchmark": "compiled_decoder", "rounds": args.rounds, "steps": args.steps,
                      "step_ms": {f"{v}/{d}": ms for (v, d), ms in med.items()},
                      "speedup": {v: med[v, "python"] / med[v, "compiled"] for v in paths},
                      "vs_dense": {d: {v: med["dense", d] / med[v, d] for v in paths if v != "dense"} for d in DECODERS},
                      "checkpoints": {v: str(p) for v, p in paths.items()}, **run_facts()}))


if __name__ == "__main__":
    main()
