"""Quality of layer-wise unstructured pruning on SmolLM2: every method x allocation x sparsity.

Calibration: 128 x 512 tokens of the c4 calibration split. Perplexity: windows of
1024 tokens of the wiki eval split (--windows of them; the table states it).
Each finished row is appended to --rows (JSONL), so an interrupted benchmark
continues where it stopped; --only runs a subset ("wanda:atp:0.7,dense").

    python benchmarks/quality_unstructured.py --windows 32
    python benchmarks/quality_unstructured.py --only wanda:uniform:0.7,wanda:atp:0.7
    python benchmarks/quality_unstructured.py --report      # table + plot of the rows so far

Prints a table, writes a plot next to --rows, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import run_facts
from compress.checkpoint import load_checkpoint
from compress.data.text import eval_token_ids
from compress.eval.perplexity import perplexity
from compress.models.registry import fetch_model
from compress.sparsity.prune import prune_model
from compress.sparsity.recipe import parse_recipe

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "atp", "rmi")
SPARSITIES = (0.5, 0.6, 0.7)


def all_rows() -> list[str]:
    rows = ["dense"]
    rows += [f"{m}:{a}:{s}" for s in SPARSITIES for m in METHODS for a in ALLOCATIONS]
    rows += [f"{m}:2:4" for m in METHODS]
    return rows


def recipe_for(row: str, args) -> dict:
    parts = row.split(":")
    base = {"method": parts[0], "dtype": "bfloat16",
            "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": 8},
            "atp": {"selection_windows": args.selection_windows}}
    if parts[1:] == ["2", "4"]:
        return {**base, "pattern": "2:4"}
    return {**base, "allocation": parts[1], "sparsity": float(parts[2])}


def run_row(row: str, path: Path, ids: torch.Tensor, args) -> dict:
    loaded = load_checkpoint(path, dtype=torch.bfloat16)
    model, tok = loaded.model.eval(), loaded.tokenizer
    result = {"row": row, "prune_seconds": 0.0}
    if row != "dense":
        report = prune_model(model, tok, parse_recipe(recipe_for(row, args)))
        result.update(prune_seconds=report.seconds["total"], achieved_sparsity=report.achieved_sparsity,
                      allocation_seconds=report.seconds["allocation"], beta=report.allocation.get("beta"),
                      layer_rates=report.layer_rates)
    ppl = perplexity(model, ids, 1024, args.windows)
    result.update(ppl=ppl.ppl, windows=ppl.windows, eval_seconds=ppl.seconds)
    return result


def table(results: dict[str, dict], windows: int) -> str:
    dense = results.get("dense", {}).get("ppl")
    lines = [f"wiki eval perplexity at 1024 tokens, {windows} windows; bf16; calibration c4 128 x 512",
             f"{'method':<10} {'allocation':<9} {'sparsity':>8} {'ppl':>9} {'vs dense':>8} {'vs uniform':>10} "
             f"{'prune s':>8} {'thr':>3}  beta",
             "-" * 82]
    for row in all_rows():
        if row not in results:
            continue
        r = results[row]
        parts = row.split(":") if row != "dense" else ["dense", "-", "0"]
        method, allocation, sparsity = (parts[0], "2:4", "0.5") if parts[1:] == ["2", "4"] else parts
        ratio = f"{r['ppl'] / dense:.2f}x" if dense else ""
        uniform = results.get(f"{method}:uniform:{sparsity}", {}).get("ppl")
        vs_uniform = f"{r['ppl'] / uniform:.2f}x" if uniform and allocation not in ("uniform", "2:4", "-") else ""
        beta = f"{r['beta']:.3f}" if r.get("beta") is not None else ""
        lines.append(f"{method:<10} {allocation:<9} {float(sparsity):>8.1f} {r['ppl']:>9.2f} {ratio:>8} "
                     f"{vs_uniform:>10} {r['prune_seconds']:>8.1f} {r.get('threads', 2):>3}  {beta}")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(ALLOCATIONS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))  # same in every panel
    fig, axes = plt.subplots(1, len(METHODS), figsize=(13, 4), sharey=True)
    for ax, method in zip(axes, METHODS):
        for allocation in ALLOCATIONS:
            pts = [(s, results[f"{method}:{allocation}:{s}"]["ppl"]) for s in SPARSITIES
                   if f"{method}:{allocation}:{s}" in results]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colors[allocation], label=allocation)
        if "dense" in results:
            ax.axhline(results["dense"]["ppl"], color="gray", ls="--", lw=0.8, label="dense")
        ax.set_title(method)
        ax.set_xlabel("sparsity")
        ax.set_yscale("log")
    axes[0].set_ylabel("wiki perplexity @1024")
    handles = [plt.Line2D([], [], color=c, marker="o", label=a) for a, c in colors.items()]
    handles.append(plt.Line2D([], [], color="gray", ls="--", label="dense"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=32, help="wiki eval windows of 1024 tokens")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--selection-windows", type=int, default=8, help="ATP search: selection windows per beta")
    p.add_argument("--only", default=None, help="comma-separated rows (default: all)")
    p.add_argument("--rows", type=Path, default=Path("benchmarks/results/quality_unstructured.jsonl"))
    p.add_argument("--report", action="store_true", help="only print the table and plot of the rows so far")
    args = p.parse_args()

    args.rows.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.rows.is_file():
        for line in args.rows.read_text().splitlines():
            r = json.loads(line)
            if r.get("windows") == args.windows:
                results[r["row"]] = r
    if args.report:
        print(table(results, args.windows))
        plot(results, args.rows.with_suffix(".png"))
        return
    path = fetch_model("smollm2-135m-instruct")
    ids = eval_token_ids(load_checkpoint(path).tokenizer)
    wanted = args.only.split(",") if args.only else all_rows()
    for row in wanted:
        if row in results:
            continue
        start = time.perf_counter()
        results[row] = run_row(row, path, ids, args)
        results[row].update(wall_seconds=time.perf_counter() - start, threads=torch.get_num_threads())
        with args.rows.open("a") as fh:
            fh.write(json.dumps(results[row]) + "\n")
        print(f"{row}: ppl {results[row]['ppl']:.2f}", flush=True)
    print(table(results, args.windows))
    plot(results, args.rows.with_suffix(".png"))
    print(json.dumps({"benchmark": "quality_unstructured", "windows": args.windows,
                      "results": {k: {kk: vv for kk, vv in v.items() if kk != "layer_rates"}
                                  for k, v in results.items()}, **run_facts()}))


if __name__ == "__main__":
    main()
