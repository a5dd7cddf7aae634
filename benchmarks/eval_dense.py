"""Dense SmolLM2 baseline: wiki perplexity (bf16, 1024) and the seven-task zero-shot average.

Usage:
    python benchmarks/eval_dense.py                       # full wiki split, all items of every task
    python benchmarks/eval_dense.py --max-windows 32 --limit 200   # a bounded run

Prints a table, then one JSON line (results, times, command, commit, load, versions).
"""

from __future__ import annotations

import argparse
import json
import os

from common import run_facts
from compress.data.tasks import SEVEN_TASKS
from compress.eval import DTYPES, EvalConfig, run_evaluation
from compress.models.registry import fetch_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=None, help="windows of the wiki split (default: all)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--tasks", nargs="+", default=list(SEVEN_TASKS))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch_model(args.model) if not os.path.isdir(args.model) else args.model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).eval()
    tok = AutoTokenizer.from_pretrained(path)
    config = EvalConfig(seq_len=args.seq_len, max_windows=args.max_windows, tasks=args.tasks, limit=args.limit,
                        dtype=args.dtype, batch_size=args.batch_size)
    report = run_evaluation(model, tok, config, name=args.model)
    print(report.table())
    print(json.dumps({"benchmark": "eval_dense", **report.model_dump(), **run_facts()}))


if __name__ == "__main__":
    main()
