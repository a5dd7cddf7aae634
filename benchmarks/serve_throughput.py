"""Serving speed of SmolLM2 dense and 70%-sparse through the real server, measured from the client.

Starts ``sparse-serve`` on 127.0.0.1 once per variant (dense, then the Wanda 70% checkpoint, pruned
into the cache on first use), warms it up, then for each concurrency level sends the same chat prompts
(greedy, ``ignore_eos``, fixed ``--max-tokens``) as streaming requests with ``include_usage`` and
times them as ``vllm bench serve`` does: TTFT = first chunk with content, TPOT = (latency - TTFT) /
(output tokens - 1), throughput = output tokens / wall time of the level. Its client is aiohttp, as
vLLM's: httpx took twice the CPU per streamed token (0.45-0.53 against 0.21 ms at concurrency 1), on
the two cores the server runs on. The baseline is plain transformers ``generate`` (bf16, greedy, same
prompt and length) in this process. Both servers run at once (idle when not measured) and every round
measures HF, dense and sparse in turn (the variants' order reversed every other round), so machine
noise hits all alike; ratios are medians of the per-round ratios.

    python benchmarks/serve_throughput.py                       # dense and sparse, concurrency 1, 4, 16
    python benchmarks/serve_throughput.py --concurrency 1 --variants dense

Prints a table, then one JSON line with the ratios (all measured in this one run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import run_facts, variant_checkpoints

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a haiku about rain.",
    "Why is the sky blue?", "Give three tips for learning to code.", "What does a CPU cache do?",
    "Summarize the plot of Hamlet.", "How do vaccines work?", "What is a prime number?",
    "Describe the water cycle.", "What causes the seasons on Earth?", "How does a bicycle stay upright?",
    "What is machine learning?", "Name three planets and one fact about each.", "How do bees make honey?",
    "What is the difference between weather and climate?",
]


@dataclass
class Level:
    """Client-side timings of one concurrency level."""

    variant: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    ttft_ms: float  # median
    tpot_ms: float  # median
    tokens_per_s: float


async def one_request(session, url: str, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft, tpot, output tokens) of one streamed chat completion."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:  # line by line (an event is one line; the server escapes breaks)
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
    latency = time.perf_counter() - start
    ttft = latency if ttft is None else ttft
    return ttft, (latency - ttft) / max(tokens - 1, 1), tokens


async def run_level(url: str, variant: str, concurrency: int, rounds: int, max_tokens: int) -> Level:
    import aiohttp

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(concurrency * rounds)]
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def gated(q: str):
            async with gate:
                return await one_request(session, url, q, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(q) for q in questions))
        wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return Level(variant, concurrency, len(results), tokens, wall, 1000 * statistics.median(r[0] for r in results),
                 1000 * statistics.median(r[1] for r in results), tokens / wall)


class HFGenerate:
    """Plain transformers ``generate`` (bf16, greedy, fixed length) on the first prompt: the baseline."""

    def __init__(self, path: Path, max_tokens: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        text = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                       tokenize=False)
        self.ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        self.kwargs = dict(do_sample=False, pad_token_id=tok.eos_token_id)
        self.max_tokens = max_tokens
        self.generate(8)  # warm-up

    def generate(self, n: int) -> float:
        """Output tokens/s of one fixed-length greedy generation."""
        with torch.no_grad():
            start = time.perf_counter()
            self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, **self.kwargs)
        return n / (time.perf_counter() - start)


class Server:
    """A ``sparse-serve`` subprocess on a loopback port, stopped on exit."""

    def __init__(self, model: str, port: int, extra: list[str]):
        self.url = f"http://127.0.0.1:{port}"
        # run from the repository root: started in benchmarks/, ``-m`` would import benchmarks/kernels.py as
        # the ``kernels`` package
        self.proc = subprocess.Popen([sys.executable, "-m", "sparse_serve.cli", model, "--port", str(port),
                                      "--log-level", "warning", *extra], cwd=Path(__file__).resolve().parents[1])

    def __enter__(self) -> "Server":
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the server did not become healthy in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def summarize(rounds: list[Level]) -> Level:
    """The median of each timing over the rounds of one (variant, concurrency)."""
    first = rounds[0]
    med = {k: statistics.median(getattr(r, k) for r in rounds) for k in ("wall_s", "ttft_ms", "tpot_ms", "tokens_per_s")}
    return Level(first.variant, first.concurrency, first.requests, first.output_tokens, **med)


def median_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios a/b and its 25-75% spread."""
    ratios = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def table(levels: list[Level], hf: float) -> str:
    lines = [f"plain transformers generate (bf16, greedy): {hf:.1f} output tokens/s (median)",
             f"{'variant':<8} {'conc':>4} {'reqs':>4} {'out tok':>7} {'TTFT ms':>8} {'TPOT ms':>8} {'tok/s':>7} "
             f"{'vs c=1':>6}", "-" * 61]
    base = {lv.variant: lv.tokens_per_s for lv in levels if lv.concurrency == 1}
    for lv in levels:
        vs_c1 = f"{lv.tokens_per_s / base[lv.variant]:.2f}x" if lv.variant in base else ""
        lines.append(f"{lv.variant:<8} {lv.concurrency:>4} {lv.requests:>4} {lv.output_tokens:>7} {lv.ttft_ms:>8.1f} "
                     f"{lv.tpot_ms:>8.1f} {lv.tokens_per_s:>7.1f} {vs_c1:>6}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="dense,sparse", help="comma-separated: dense, sparse")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ratios are medians over rounds)")
    p.add_argument("--max-tokens", type=int, default=64, help="fixed output length (ignore_eos)")
    p.add_argument("--sparse", type=Path, default=None, help="sparse checkpoint (default: Wanda 70%% in the cache)")
    p.add_argument("--port", type=int, default=8123, help="first port (one per variant, on 127.0.0.1)")
    args = p.parse_args()

    from compress.models.registry import fetch_model

    dense_path = fetch_model("smollm2-135m-instruct")  # the HF generate baseline runs on it in any case
    variants = args.variants.split(",")
    paths = variant_checkpoints(variants, args.sparse)
    levels = [int(x) for x in args.concurrency.split(",")]
    hf = HFGenerate(dense_path, args.max_tokens)
    runs: dict[tuple[str, int], list[Level]] = {}
    hf_runs: list[float] = []
    with contextlib.ExitStack() as stack:
        servers = {v: stack.enter_context(Server(str(paths[v]), args.port + i, ["--max-num-seqs", "16"]))
                   for i, v in enumerate(variants)}
        for server in servers.values():
            asyncio.run(run_level(server.url, "warm-up", 2, 1, 8))
        for r in tqdm(range(args.rounds), desc="rounds"):  # A, B, B, A: the machine's noise hits all alike
            hf_runs.append(hf.generate(args.max_tokens))
            for c in levels:
                for v in variants if r % 2 == 0 else variants[::-1]:
                    level = asyncio.run(run_level(servers[v].url, v, c, 1 if c > 1 else 2, args.max_tokens))
                    runs.setdefault((v, c), []).append(level)
    summary = [summarize(runs[(v, c)]) for v in variants for c in levels]
    print(table(summary, statistics.median(hf_runs)))
    tps = {key: [lv.tokens_per_s for lv in rounds] for key, rounds in runs.items()}
    ratios = {}
    if ("dense", 1) in tps:
        ratios["dense_c1_vs_hf_generate"] = median_ratio(tps[("dense", 1)], hf_runs)
    for v in variants:
        if (v, 1) in tps and (v, max(levels)) in tps and max(levels) > 1:
            ratios[f"{v}_c{max(levels)}_vs_c1"] = median_ratio(tps[(v, max(levels))], tps[(v, 1)])
    if "sparse" in variants and "dense" in variants:
        for c in levels:
            ratios[f"sparse_vs_dense_c{c}"] = median_ratio(tps[("sparse", c)], tps[("dense", c)])
    print("ratios (median of per-round ratios, [25%, 75%]):")
    for name, (m, lo, hi) in ratios.items():
        print(f"  {name:<26} {m:5.2f}x  [{lo:.2f}, {hi:.2f}]")
    print(json.dumps({"benchmark": "serve_throughput", "rounds": args.rounds, "max_tokens": args.max_tokens,
                      "hf_generate_tokens_per_s": hf_runs, "ratios": {k: v[0] for k, v in ratios.items()},
                      "ratio_spread": {k: [v[1], v[2]] for k, v in ratios.items()},
                      "levels": [asdict(lv) for lv in summary], "sparse_checkpoint": str(paths.get("sparse")),
                      **run_facts()}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
