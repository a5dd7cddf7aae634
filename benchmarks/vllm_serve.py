"""Greedy generation through vLLM (CPU) with the sparse_vllm plugin: dense vs exported sparse / FLAP checkpoints.

    python benchmarks/vllm_serve.py dense=~/.cache/sparse-serve/models/smollm2-135m-instruct \\
        wanda70=OUT/smollm2-wanda-70-vllm flap50=OUT/smollm2-flap-50-vllm --reference wanda70=SRC_DIR

Each variant runs in its own process (one vLLM engine start each, vLLM's default torch.compile mode
unless --eager) in bf16: a warm-up, then ``--rounds`` rounds of batch 1 and batch 8 generating
``--tokens`` tokens each with ``ignore_eos`` (chat prompts, greedy), and one greedy answer. Prints a
table (median tokens/s, ratio to the first variant) and a final JSON line. ``--reference NAME=DIR``
also checks NAME's batch-1 outputs against the project's reference forward (transformers through
``load_checkpoint``, bf16, teacher-forced): exact argmax, or within 4 bf16 steps of it.
Run it in vLLM's environment (``.venv-vllm``); pin it with ``taskset`` and ``VLLM_CPU_OMP_THREADS_BIND``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?",
             "Write a haiku about the sea.", "What is 12 times 7?", "Who wrote Hamlet?",
             "Give me a synonym for happy.", "What do bees make?"]


def worker(model: str, tokens: int, rounds: int, eager: bool) -> dict:
    """Runs in the variant's own process: timings and outputs as a dict."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=eager)
    start_s = time.perf_counter() - started
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for q in QUESTIONS]
    fixed = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(temperature=0.0, max_tokens=8),
                 use_tqdm=False)
    speeds: dict[str, list[float]] = {"1": [], "8": []}
    outputs = None
    for _ in range(rounds):
        for batch in (1, 8):
            began = time.perf_counter()
            result = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:batch]], fixed, use_tqdm=False)
            speeds[str(batch)].append(batch * tokens / (time.perf_counter() - began))
            if batch == 1:
                outputs = [list(r.outputs[0].token_ids) for r in result]
    answer = llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(temperature=0.0, max_tokens=32),
                          use_tqdm=False)[0].outputs[0].text
    return {"start_s": start_s, "tok_s": {b: statistics.median(v) for b, v in speeds.items()},
            "prompt": prompts[0], "output": outputs[0], "answer": answer}


def run_variant(model: str, args: argparse.Namespace) -> dict:
    """One engine start in a fresh process; its results come back through a file (vLLM also prints)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", model, "--result", str(result), "--tokens", str(args.tokens),
               "--rounds", str(args.rounds)] + (["--eager"] if args.eager else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if done.returncode != 0 or not result.exists():
            raise SystemExit(f"{model}: vLLM failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def bf16_ulp(value: float) -> float:
    return 2.0 ** (math.floor(math.log2(max(abs(value), 1e-30))) - 7)


def check_reference(source: Path, prompt: list[int], output: list[int]) -> dict:
    """Teacher-forced comparison of one greedy output with the reference forward in bf16."""
    import torch

    from compress.checkpoint import load_checkpoint

    model = load_checkpoint(source, dtype=torch.bfloat16).model
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1].float()  # [steps, V]
    exact = sum(int(row.argmax()) == t for row, t in zip(logits, output))
    worst = max(float(row.max() - row[t]) / bf16_ulp(float(row.max())) for row, t in zip(logits, output))
    return {"steps": len(output), "exact": exact, "worst_gap_bf16_ulps": round(worst, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="NAME=CHECKPOINT_DIR, baseline first")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (no torch.compile)")
    parser.add_argument("--reference", action="append", default=[], help="NAME=SOURCE_DIR to check NAME against")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(worker(args.worker, args.tokens, args.rounds, args.eager)))
        return
    results = {name: run_variant(str(Path(path).expanduser()), args)
               for name, path in (v.split("=", 1) for v in args.variants)}
    base = next(iter(results.values()))
    print(f"{'variant':10s} {'start s':>8s} {'b1 tok/s':>9s} {'vs':>6s} {'b8 tok/s':>9s} {'vs':>6s}  answer")
    for name, r in results.items():
        b1, b8 = r["tok_s"]["1"], r["tok_s"]["8"]
        print(f"{name:10s} {r['start_s']:8.1f} {b1:9.1f} {b1 / base['tok_s']['1']:5.2f}x {b8:9.1f} "
              f"{b8 / base['tok_s']['8']:5.2f}x  {r['answer'][:60]!r}")
    checks = {name: check_reference(Path(src).expanduser(), results[name]["prompt"], results[name]["output"])
              for name, src in (v.split("=", 1) for v in args.reference)}
    for name, c in checks.items():
        print(f"reference check {name}: {c['exact']}/{c['steps']} steps exact, worst gap {c['worst_gap_bf16_ulps']} "
              "bf16 steps")
    print(json.dumps({"results": {n: {k: r[k] for k in ("start_s", "tok_s", "answer")} for n, r in results.items()},
                      "reference_checks": checks, "tokens": args.tokens, "rounds": args.rounds, "eager": args.eager}))


if __name__ == "__main__":
    main()
