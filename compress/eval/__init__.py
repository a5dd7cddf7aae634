"""Evaluation every compression method reports: perplexity and zero-shot accuracy.

Contract: ``run_evaluation(model, tokenizer, EvalConfig(...))`` returns an
:class:`EvalReport` that states everything needed to compare it with another
(split, window length, number of windows, dtype, task item counts), renders as
a table, and serialises to the JSON stored in a checkpoint's manifest under
``evaluation``.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.data.tasks import SEVEN_TASKS, TASKS
from compress.data.text import eval_token_ids
from compress.eval.perplexity import PerplexityResult, perplexity
from compress.eval.zeroshot import TaskResult, evaluate_task, seven_task_average

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32,
                                  "float16": torch.float16}


class EvalConfig(BaseModel):
    """What to evaluate; every field is also a CLI flag of ``sparse-compress eval``."""

    model_config = ConfigDict(extra="forbid")

    split: str = Field("eval", description="text split (or file) for perplexity")
    seq_len: int = Field(1024, ge=2, description="perplexity window length, tokens")
    max_windows: int | None = Field(None, ge=1, description="score at most this many windows")
    tasks: list[str] = Field(default_factory=list, description="zero-shot tasks; 'seven' = the papers' seven")
    limit: int | None = Field(None, ge=1, description="items per zero-shot task (all by default)")
    batch_size: int = Field(8, ge=1, description="zero-shot scoring batch size")
    dtype: Literal["bfloat16", "float32", "float16"] = Field(
        "bfloat16", description="compute dtype (bf16 is ~2x faster than fp32 on this CPU)")
    skip_perplexity: bool = Field(False, description="only run the zero-shot tasks")

    def task_names(self) -> list[str]:
        names: list[str] = []
        for t in self.tasks:
            expanded = list(SEVEN_TASKS) if t == "seven" else [t]
            for name in expanded:
                if name not in TASKS:
                    raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)} or 'seven'")
                if name not in names:
                    names.append(name)
        return names


class EvalReport(BaseModel):
    """Results of one evaluation run."""

    model_config = ConfigDict(extra="forbid")

    model: str
    dtype: str
    threads: int
    perplexity: dict | None = None  # PerplexityResult fields plus "split"
    tasks: dict[str, dict] = Field(default_factory=dict)  # name -> TaskResult fields
    seven_task_average: float | None = None
    seconds: float = 0.0

    def table(self) -> str:
        """Human-readable summary, one row per metric."""
        rows = [("metric", "value", "detail")]
        if self.perplexity:
            p = self.perplexity
            rows.append((f"perplexity ({p['split']}, len {p['seq_len']})", f"{p['ppl']:.3f}",
                         f"{p['windows']} windows, {p['seconds']:.1f} s"))
        for name, r in self.tasks.items():
            norm = "" if r["acc_norm"] is None else f", acc_norm {r['acc_norm']:.4f}"
            rows.append((f"{name} acc", f"{r['acc']:.4f}", f"{r['items']} items{norm}, {r['seconds']:.1f} s"))
        if self.seven_task_average is not None:
            rows.append(("seven-task average acc", f"{self.seven_task_average:.4f}", ", ".join(SEVEN_TASKS)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


def run_evaluation(model: torch.nn.Module, tokenizer, config: EvalConfig, name: str = "model",
                   progress: bool = True) -> EvalReport:
    """Evaluate ``model`` as ``config`` says (the model must already be in ``config.dtype``)."""
    start = time.perf_counter()
    report = EvalReport(model=name, dtype=config.dtype, threads=torch.get_num_threads())
    task_names = config.task_names()
    if not config.skip_perplexity:
        ids = eval_token_ids(tokenizer, config.split)
        result: PerplexityResult = perplexity(model, ids, config.seq_len, config.max_windows,
                                              progress=progress)
        report.perplexity = {"split": config.split, **result.to_dict()}
    results: dict[str, TaskResult] = {}
    for task in task_names:
        results[task] = evaluate_task(model, tokenizer, task, config.limit, config.batch_size, progress)
    report.tasks = {t: r.to_dict() for t, r in results.items()}
    report.seven_task_average = seven_task_average(results)
    report.seconds = time.perf_counter() - start
    return report
