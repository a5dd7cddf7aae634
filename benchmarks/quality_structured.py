"""Quality and decode speed of structured pruning on SmolLM2: Wanda-sp, FLAP without / with bias
compensation, and Self-Pruner's searched rates, at 20% and 50% of the decoder linears' parameters.

Calibration: --samples x --seq-len tokens of the c4 calibration split (FLAP's dense statistics are
computed once, cached under --work, and shared by FLAP, FLAP without bias and Self-Pruner; Wanda-sp
collects its own, layer after pruned layer). Self-Pruner runs the classical operators with a small
population (--population, --crossovers, --mutations, --generations), fitness = perplexity on
--selection-windows windows of --selection-seq-len tokens of the held-out selection split. Quality:
perplexity on --windows windows of 1024 tokens of the wiki eval split, and zero-shot accuracy on
--tasks (first --limit items each; the average is over those tasks). Every pruned model is saved as a
sparse-serve checkpoint under --work; each finished row is appended to --rows (JSONL), so an
interrupted run continues where it stopped.

Speed (--speed, a separate phase): greedy decode tokens/s at batch 1 of every checkpoint through
sparse-serve's engine and through transformers' generate. Every measurement of a pruned model is
paired with one of dense taken right before or after it (the order alternates by round), so the
machine's slow drifts hit both alike; speedups are medians of the paired ratios over --rounds, with
their interquartile range in the JSON.

    python benchmarks/quality_structured.py                 # all quality rows
    python benchmarks/quality_structured.py --speed         # decode speed of the saved checkpoints
    python benchmarks/quality_structured.py --report        # table + plot of the rows so far

Prints a table, writes a plot next to --rows, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch

from common import run_facts
from compress.assets import cache_dir
from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.data.text import eval_token_ids
from compress.eval.perplexity import perplexity
from compress.eval.zeroshot import evaluate_task
from compress.models.registry import fetch_model
from compress.structured.flap import STATS_FILE, structured_prune
from compress.structured.recipe import FlapRecipe, SelfPruneRecipe
from compress.structured.selfprune import self_prune

METHODS = ("wanda-sp", "flap-nobias", "flap", "self-prune")
LABELS = {"wanda-sp": "Wanda-sp", "flap-nobias": "FLAP, no bias", "flap": "FLAP", "self-prune": "Self-Pruner"}
MODEL = "smollm2-135m-instruct"


def all_rows(ratios: list[float]) -> list[str]:
    return ["dense"] + [f"{m}:{r}" for r in ratios for m in METHODS]


def calibration(args) -> dict:
    return {"samples": args.samples, "seq_len": args.seq_len, "batch_size": 32}


def prune_row(row: str, model, tok, args, base: Path) -> dict:
    """Prune ``model`` in place as the row says; return the report as a dict."""
    method, ratio = row.split(":")[0], float(row.split(":")[1])
    shared = args.work / "state"  # FLAP's dense statistics, computed once
    common = {"ratio": ratio, "calibration": calibration(args)}
    if method == "self-prune":
        state = args.work / f"state-{row.replace(':', '-')}"
        state.mkdir(parents=True, exist_ok=True)
        if (shared / STATS_FILE).is_file() and not (state / STATS_FILE).is_file():
            shutil.copyfile(shared / STATS_FILE, state / STATS_FILE)
        recipe = SelfPruneRecipe(**common, population=args.population, crossovers=args.crossovers,
                                 mutations=args.mutations, generations=args.generations,
                                 selection_windows=args.selection_windows,
                                 selection_seq_len=args.selection_seq_len)
        return self_prune(model, tok, recipe, state_dir=state, job=str(base)).to_dict()
    if method == "wanda-sp":
        return structured_prune(model, tok, FlapRecipe(method="wanda-sp", **common), job=str(base)).to_dict()
    recipe = FlapRecipe(method="flap", bias_compensation=method == "flap", **common)
    return structured_prune(model, tok, recipe, state_dir=shared, job=str(base)).to_dict()


def run_row(row: str, base: Path, ids: torch.Tensor, args) -> dict:
    loaded = load_checkpoint(base, dtype=torch.bfloat16)
    model, tok = loaded.model.eval(), loaded.tokenizer
    result: dict = {"row": row, "prune_seconds": 0.0}
    if row != "dense":
        report = prune_row(row, model, tok, args, base)
        result.update(achieved_ratio=report["achieved_ratio"], params_after=report["params_after"],
                      params_before=report["params_before"], prune_seconds=report["seconds"]["total"],
                      heads=[layer["num_heads"] for layer in report["layers"]],
                      mlp_widths=[layer["intermediate_size"] for layer in report["layers"]])
        if report["search"]:
            s = report["search"]
            result.update(search_best_fitness=s["best"]["fitness"], search_evaluations=s["evaluations"],
                          search_candidates=s["candidates"], searched_rates=s["best"]["rates"],
                          search_first_best=s["history"][0]["best_fitness"],
                          search_settings={k: getattr(args, k) for k in ("population", "crossovers", "mutations",
                                                                         "generations", "selection_windows",
                                                                         "selection_seq_len")},
                          search_operators=s["operators"])
        save_checkpoint(model, tok, checkpoint_dir(args, row), recipe=report["recipe"], base_model=str(base))
    ppl = perplexity(model, ids, 1024, args.windows)
    result.update(ppl=ppl.ppl, windows=ppl.windows, eval_seconds=ppl.seconds)
    tasks = {}
    for task in args.tasks:
        r = evaluate_task(model, tok, task, args.limit)
        tasks[task] = {"acc": r.acc, "items": r.items}
    result.update(zeroshot=tasks, zeroshot_avg=sum(t["acc"] for t in tasks.values()) / max(len(tasks), 1))
    return result


def checkpoint_dir(args, row: str) -> Path:
    return args.work / "checkpoints" / row.replace(":", "-")


# -- speed -----------------------------------------------------------------------------------------------
class _Stamps:
    """A logits processor that only records when each new token is chosen."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def engine_decode_rate(serving, prompt: list[int], tokens: int) -> float:
    """Greedy decode tokens/s at batch 1 through sparse-serve's engine (prefill excluded)."""
    from sparse_serve.config import CacheConfig, EngineConfig
    from sparse_serve.engine import LLMEngine
    from sparse_serve.sampling_params import SamplingParams

    engine = LLMEngine(serving.model, set(), len(prompt) + tokens + 1,
                       EngineConfig(cache=CacheConfig(kv_cache_gb=0.05)), torch.bfloat16)
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    stamps = []
    while engine.has_work():
        engine.step()
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])  # every step after the prefill decodes one token


@torch.no_grad()
def hf_decode_rate(model, prompt: list[int], tokens: int) -> float:
    """Greedy decode tokens/s at batch 1 through transformers' generate (prefill excluded)."""
    stamps = _Stamps()
    model.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                   logits_processor=[stamps], pad_token_id=0)
    return (len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0])


def check_checkpoints(rows: list[str], args) -> None:
    """--speed times saved checkpoints: stop, naming them, when some of ``rows`` have none."""
    missing = [f"{row} ({checkpoint_dir(args, row)})" for row in rows
               if row != "dense" and not (checkpoint_dir(args, row) / "config.json").is_file()]
    if missing:
        raise SystemExit(f"--speed measures saved checkpoints, and these rows have none: {', '.join(missing)}. "
                         f"Run the same command without --speed first (it builds them under --work), or "
                         f"point --work at where they are.")


def measure_speed(rows: list[str], base: Path, args) -> dict[str, dict]:
    from sparse_serve.loader import load_for_serving

    rows = ["dense"] + [row for row in rows if row != "dense"]  # every row is timed against dense
    paths = {row: base if row == "dense" else checkpoint_dir(args, row) for row in rows}
    serving = {row: load_for_serving(p, dtype=torch.bfloat16) for row, p in paths.items()}
    plain = {row: load_checkpoint(p, dtype=torch.bfloat16).model.eval() for row, p in paths.items()}
    tok = serving["dense"].tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                                   add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    measure = {"engine": lambda row, n: engine_decode_rate(serving[row], prompt, n),
               "hf": lambda row, n: hf_decode_rate(plain[row], prompt, n)}
    rates: dict[str, dict[str, list[float]]] = {row: {"engine": [], "hf": []} for row in paths}
    ratios: dict[str, dict[str, list[float]]] = {row: {"engine": [], "hf": []} for row in paths}
    for row in paths:  # warm-up
        for fn in measure.values():
            fn(row, 8)
    for rnd in range(args.rounds):
        for row in paths:
            if row == "dense":
                continue
            for kind, fn in measure.items():  # dense and the row back to back, order alternating by round
                order = ("dense", row) if rnd % 2 == 0 else (row, "dense")
                pair = {r: fn(r, args.decode_tokens) for r in order}
                rates[row][kind].append(pair[row])
                rates["dense"][kind].append(pair["dense"])
                ratios[row][kind].append(pair[row] / pair["dense"])
        print(f"speed round {rnd + 1}/{args.rounds}: engine speedup " + ", ".join(
            f"{row} {ratios[row]['engine'][-1]:.2f}x" for row in paths if row != "dense"), flush=True)
    out = {}
    for row, r in rates.items():
        out[row] = {f"{kind}_tok_s": statistics.median(v) for kind, v in r.items()}
        for kind in ("engine", "hf"):
            out[row][f"{kind}_speedup"] = statistics.median(ratios[row][kind]) if row != "dense" else 1.0
            if row != "dense":
                q = statistics.quantiles(ratios[row][kind], n=4) if len(ratios[row][kind]) > 1 else [out[row][f"{kind}_speedup"]] * 3
                out[row][f"{kind}_speedup_iqr"] = [q[0], q[2]]
        out[row].update(rounds=args.rounds, decode_tokens=args.decode_tokens, prompt_tokens=len(prompt))
    return out


# -- report ----------------------------------------------------------------------------------------------
def table(results: dict[str, dict], speed: dict[str, dict], args) -> str:
    dense = results.get("dense", {})
    dense_params = next((r["params_before"] for r in results.values() if "params_before" in r), float("nan"))
    # the speed settings the rows were measured with (a --report run's own flags are only defaults)
    timed = next((r for r in speed.values() if "rounds" in r), {})
    tokens, rounds = timed.get("decode_tokens", args.decode_tokens), timed.get("rounds", args.rounds)
    lines = [f"wiki eval perplexity at 1024 tokens, {args.windows} windows; zero-shot acc, first {args.limit} items "
             f"of {', '.join(args.tasks)}; bf16; decode tok/s at batch 1 ({tokens} tokens, median of "
             f"{rounds} interleaved rounds)",
             f"{'method':<14} {'target':>6} {'removed':>7} {'params':>7} {'ppl':>9} {'vs dense':>8} {'0-shot':>6} "
             f"{'engine tok/s':>12} {'speedup':>7} {'HF tok/s':>8} {'speedup':>7} {'prune s':>7}",
             "-" * 112]
    for row in all_rows(args.ratios):
        if row not in results and row not in speed:
            continue
        method, target = (row, "-") if row == "dense" else (row.split(":")[0], row.split(":")[1])
        s = speed.get(row, {})
        eng = f"{s['engine_tok_s']:.1f}" if s else ""
        eng_x = f"{s['engine_speedup']:.2f}x" if s else ""
        hf = f"{s['hf_tok_s']:.1f}" if s else ""
        hf_x = f"{s['hf_speedup']:.2f}x" if s else ""
        quality = f"{'':>7} {'':>7} {'':>9} {'':>8} {'':>6}"  # a row timed (--speed) but not evaluated yet
        if row in results:
            r = results[row]
            ratio = f"{r['ppl'] / dense['ppl']:.2f}x" if dense else ""
            params = r.get("params_after", dense_params)
            quality = (f"{r.get('achieved_ratio', 0.0):>7.3f} {params / 1e6:>6.1f}M {r['ppl']:>9.2f} {ratio:>8} "
                       f"{r['zeroshot_avg']:>6.3f}")
        prune = f"{results[row]['prune_seconds']:.0f}" if row in results else ""
        lines.append(f"{LABELS.get(method, method):<14} {target:>6} {quality} {eng:>12} {eng_x:>7} {hf:>8} {hf_x:>7} "
                     f"{prune:>7}")
    return "\n".join(lines)


def plot(results: dict[str, dict], speed: dict[str, dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for method in METHODS:
        pts = [(r, results[f"{method}:{r}"]["ppl"]) for r in args.ratios if f"{method}:{r}" in results]
        if pts:
            left.plot(*zip(*pts), "o-", label=LABELS[method])
    if "dense" in results:
        left.axhline(results["dense"]["ppl"], color="gray", ls="--", lw=0.8, label="dense")
    left.set_yscale("log")
    left.set_xlabel("parameters removed (decoder linears)")
    left.set_ylabel("wiki perplexity @1024")
    if left.get_legend_handles_labels()[0]:  # nothing to label when only speed was measured
        left.legend(fontsize=8)
    rows = [row for row in all_rows(args.ratios) if row in speed]
    if rows:
        x = range(len(rows))
        right.bar([i - 0.2 for i in x], [speed[r]["engine_speedup"] for r in rows], 0.4, label="sparse-serve engine")
        right.bar([i + 0.2 for i in x], [speed[r]["hf_speedup"] for r in rows], 0.4, label="transformers generate")
        right.set_xticks(list(x), [r.replace(":", "\n") for r in rows], fontsize=7)
        right.axhline(1.0, color="gray", lw=0.8)
        right.set_ylabel("decode speed vs dense (batch 1)")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_rows(path: Path, windows: int) -> tuple[dict[str, dict], dict[str, dict]]:
    results, speed = {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "speed":
                speed = r["results"]
            elif r.get("windows") == windows:
                results[r["row"]] = r
    return results, speed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.5])
    p.add_argument("--windows", type=int, default=16, help="wiki eval windows of 1024 tokens")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["piqa", "arc_easy", "hellaswag", "winogrande"])
    p.add_argument("--limit", type=int, default=100, help="items per zero-shot task")
    p.add_argument("--samples", type=int, default=512, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--crossovers", type=int, default=4)
    p.add_argument("--mutations", type=int, default=4)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--selection-windows", type=int, default=8)
    p.add_argument("--selection-seq-len", type=int, default=512)
    p.add_argument("--only", default=None, help="comma-separated rows (default: all)")
    p.add_argument("--rows", type=Path, default=Path("benchmarks/results/quality_structured.jsonl"))
    p.add_argument("--work", type=Path, default=None, help="checkpoints and cached statistics "
                                                         "(default: the cache's bench/structured)")
    p.add_argument("--speed", action="store_true", help="measure decode speed of the saved checkpoints")
    p.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--report", action="store_true", help="only print the table and plot of the rows so far")
    args = p.parse_args()
    args.work = args.work or cache_dir() / "bench" / "structured"

    args.rows.parent.mkdir(parents=True, exist_ok=True)
    results, speed = load_rows(args.rows, args.windows)
    if not args.report:
        wanted = args.only.split(",") if args.only else all_rows(args.ratios)
        if args.speed:
            check_checkpoints(wanted, args)
        base = fetch_model(MODEL)
        if args.speed:
            speed = measure_speed(wanted, base, args)
            with args.rows.open("a") as fh:
                fh.write(json.dumps({"kind": "speed", "results": speed, "threads": torch.get_num_threads()}) + "\n")
        else:
            ids = eval_token_ids(load_checkpoint(base).tokenizer)
            for row in wanted:
                if row in results:
                    continue
                start = time.perf_counter()
                results[row] = run_row(row, base, ids, args)
                results[row].update(wall_seconds=time.perf_counter() - start, threads=torch.get_num_threads())
                with args.rows.open("a") as fh:
                    fh.write(json.dumps(results[row]) + "\n")
                print(f"{row}: ppl {results[row]['ppl']:.2f}, zero-shot {results[row]['zeroshot_avg']:.3f}",
                      flush=True)
    print(table(results, speed, args))
    plot(results, speed, args, args.rows.with_suffix(".png"))
    keep = ("ppl", "zeroshot_avg", "achieved_ratio", "params_after", "prune_seconds", "search_best_fitness")
    print(json.dumps({"benchmark": "quality_structured", "windows": args.windows, "tasks": args.tasks,
                      "limit": args.limit,
                      "results": {k: {kk: v[kk] for kk in keep if kk in v} for k, v in results.items()},
                      "speed": speed, **run_facts()}))


if __name__ == "__main__":
    main()
