"""The LM head's argmax screen (kernels/argmax_screen.py): greedy tokens without reading all of the head.

Part one: the head alone on real activations. Serving engines on SmolLM2 dense and on the Wanda 70% checkpoint
answer four chat questions greedily (64 tokens each) and every activation row that reaches the LM head is
kept. Each is then put through the head both ways, weights from memory (a 64 MiB buffer written before every
call), order alternating: the full head as the engine ran it before (the coded decode GEMV, float32, argmax)
and the screen (``PrepackedLinear.argmax``); rows one at a time and in groups of two and four. The two must
agree on every token; the table shows the median time of each, their ratio, and how many rows the screen
left to the exact pass (from :func:`kernels.argmax_screen.screen_bounds`).
Part two: decode steps through the engine, screen on and off (``load_for_serving(argmax_screen=...)``), the
four engines alternating, the same greedy answers: ms per step (the prompt's excluded) and the ratio; the
tokens must be identical.

    python benchmarks/argmax_screen.py                    # 8 kernel rounds, 6 engine rounds
    python benchmarks/argmax_screen.py --engine-rounds 0  # the head only

Prints two tables, then one JSON line.
"""

from __future__ import annotations

from common import run_facts, variant_checkpoints  # first: takes benchmarks/ off sys.path

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import kernels.cpu as cpu  # noqa: E402
from kernels.argmax_screen import screen_bounds  # noqa: E402
from kernels.linear import PrepackedLinear  # noqa: E402

FLUSH_BYTES = 64 << 20
QUESTIONS = ["Explain why the sky is blue.", "Write a haiku about autumn leaves.",
             "What is the capital of France, and why is it famous?", "List three uses of a paperclip."]
MAX_TOKENS = 64
GROUPS = (1, 2, 4)


def engine(path: Path, screen: bool):
    from sparse_serve.config import EngineConfig
    from sparse_serve.engine import LLMEngine
    from sparse_serve.loader import load_for_serving

    served = load_for_serving(path, argmax_screen=screen)
    return LLMEngine(served.model, [], 1024, EngineConfig(), torch.bfloat16), served.tokenizer


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=False), add_special_tokens=False)["input_ids"]
            for q in QUESTIONS]


def answer(eng, ids: list[int], name: str) -> tuple[list[int], float]:
    """The greedy answer's token ids and the ms per decode step (the prompt's step excluded)."""
    from sparse_serve.sampling_params import SamplingParams

    eng.add_request(name, ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    eng.step()
    tokens, steps, start = [], 0, time.perf_counter()
    while eng.has_work():
        for out in eng.step()[0]:
            tokens = out.outputs[0].token_ids
        steps += 1
    return tokens, (time.perf_counter() - start) * 1e3 / max(steps, 1)


def head_rows(eng, ids: list[list[int]]) -> list[torch.Tensor]:
    """Every activation row the engine's LM head sees while answering (greedy), [1, D] bf16 each."""
    net = eng.runner.net
    seen: list[torch.Tensor] = []
    argmax = net.head_argmax

    def keep(x: torch.Tensor):
        seen.extend(row[None].clone() for row in x)
        return argmax(x)
    net.head_argmax = keep
    for i, prompt in enumerate(ids):
        answer(eng, prompt, f"keep{i}")
    net.head_argmax = argmax
    return seen


def kernel_rows(head: PrepackedLinear, rows: list[torch.Tensor], rounds: int) -> list[dict]:
    """Per group size: ms of the full head and of the screen (medians), their agreement and the exact rows."""
    from sparse_serve.sampling import argmax_rows

    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8)
    out = []
    for group in GROUPS:
        batches = [torch.cat(rows[i:i + group]) for i in range(0, len(rows) - group + 1, group)]
        full_ms, screen_ms, agree, candidates, undecided = [], [], True, [], 0
        for x in batches:
            a, b = screen_bounds(x, head.screen)
            t = (a - b).amax(dim=1, keepdim=True)
            candidates.append(int(((a + b) >= t - t.abs() / 64).any(dim=0).sum()))
        for r in tqdm(range(rounds), desc=f"kernel, {group} row(s)"):
            for x in batches:
                ways = {"full": lambda: argmax_rows(head(x).float()), "screen": lambda: head.argmax(x)}
                picked, times = {}, {}
                for way in (ways if r % 2 == 0 else reversed(ways)):
                    flush.fill_(r)
                    start = time.perf_counter()
                    picked[way] = ways[way]()
                    times[way] = (time.perf_counter() - start) * 1e3
                full_ms.append(times["full"])
                screen_ms.append(times["screen"])
                if picked["screen"] is None:
                    undecided += 1
                else:
                    agree = agree and torch.equal(picked["screen"], picked["full"])
        out.append({"rows": group, "calls": len(batches), "full_ms": statistics.median(full_ms),
                    "screen_ms": statistics.median(screen_ms),
                    "speedup": statistics.median(f / s for f, s in zip(full_ms, screen_ms)),
                    "same_tokens": agree, "undecided": undecided / (rounds * len(batches)),
                    "exact_rows_median": statistics.median(candidates), "exact_rows_max": max(candidates)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="kernel rounds (every kept row both ways per round)")
    p.add_argument("--engine-rounds", type=int, default=6, help="engine rounds (0: the head only)")
    p.add_argument("--sparse", type=Path, default=None, help="sparse checkpoint (default: Wanda 70%% in the cache)")
    args = p.parse_args()
    if not cpu.avx512_available():
        raise SystemExit(f"the screen needs the AVX-512 kernels: {cpu.avx512_unavailable_reason()}")
    paths = variant_checkpoints(["dense", "sparse"], args.sparse)
    engines = {(v, s): engine(path, s) for v, path in paths.items() for s in (False, True)}
    tokenizer = engines["dense", True][1]
    ids = prompts(tokenizer)

    result: dict = {"benchmark": "argmax_screen", "rounds": args.rounds, "kernel": {}}
    print("variant  rows  full ms  screened ms  speedup  exact rows (median, max)  same tokens  undecided")
    print("-" * 95)
    for variant in paths:
        eng = engines[variant, True][0]
        head = eng.runner.net.head_argmax.__self__
        result["screen_mib"] = head.screen.nbytes / 2**20
        rows = head_rows(eng, ids)
        result["kernel"][variant] = kernel_rows(head, rows, args.rounds)
        for r in result["kernel"][variant]:
            print(f"{variant:<8} {r['rows']:>4} {r['full_ms']:>8.3f} {r['screen_ms']:>12.3f} {r['speedup']:>7.2f}x "
                  f"{r['exact_rows_median']:>14.0f}, {r['exact_rows_max']:<9d} {str(r['same_tokens']):>11} "
                  f"{r['undecided']:>9.1%}")
    if args.engine_rounds:
        times = {key: [] for key in engines}
        answers: dict = {}
        keys = list(engines)
        for r in tqdm(range(args.engine_rounds), desc="engine rounds"):
            for key in keys if r % 2 == 0 else keys[::-1]:
                tokens, ms = answer(engines[key][0], ids[r % len(ids)], f"e{r}")
                times[key].append(ms)
                answers[key + (r,)] = tokens
        print("\nvariant  step ms, full head  step ms, screened  speedup  same tokens")
        print("-" * 67)
        result["engine"] = {}
        for variant in paths:
            full, screened = times[variant, False], times[variant, True]
            same = all(answers[variant, False, r] == answers[variant, True, r] for r in range(args.engine_rounds))
            speedup = statistics.median(f / s for f, s in zip(full, screened))
            print(f"{variant:<8} {statistics.median(full):>17.2f} {statistics.median(screened):>18.2f} "
                  f"{speedup:>7.3f}x {str(same):>12}")
            result["engine"][variant] = {"full_ms": statistics.median(full), "screened_ms": statistics.median(screened),
                                         "speedup": speedup, "same_tokens": same}
        result["engine_rounds"] = args.engine_rounds
    result["sparse_checkpoint"] = str(paths["sparse"])
    print(json.dumps({**result, **run_facts()}))


if __name__ == "__main__":
    main()
