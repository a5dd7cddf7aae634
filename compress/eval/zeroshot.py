"""Zero-shot accuracy by log-likelihood of each choice (lm-eval-harness style).

Contract: a request is a (context, continuation) pair; its score is the summed
log-probability of the continuation's tokens given the context. The
continuation's tokens are those the tokenizer gives the whole string beyond
the context's tokens (so merges across the boundary are handled as
lm-eval-harness does). A multiple-choice item is right (``acc``) when its gold
choice has the highest score, and right under ``acc_norm`` when it has the
highest score per character of continuation (lm-eval-harness ``acc_norm``). A completion item (LAMBADA) is right
when every continuation token is the greedy argmax.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from compress.data.tasks import SEVEN_TASKS, CompletionItem, MultipleChoiceItem, load_task


@dataclass(frozen=True)
class Scored:
    """Log-likelihood of one continuation and whether greedy decoding yields it."""

    logprob: float
    greedy: bool
    tokens: int


@dataclass(frozen=True)
class TaskResult:
    """Accuracy of one model on one task."""

    task: str
    acc: float
    acc_norm: float | None
    items: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context+continuation (left-truncated) and the continuation length."""
    # lm-eval moves trailing spaces of the context onto the continuation
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer(stripped, add_special_tokens=False).input_ids if stripped else []
    whole = tokenizer(stripped + continuation, add_special_tokens=False).input_ids
    cont_len = len(whole) - len(ctx)
    if not ctx:  # nothing to condition on: prefix the end-of-text token
        whole = [tokenizer.eos_token_id] + whole
    return whole[-(max_length + 1):], cont_len


@torch.no_grad()
def score_requests(model: torch.nn.Module, tokenizer, requests: Sequence[tuple[str, str]],
                   batch_size: int = 8, max_length: int = 2048, progress: bool = True,
                   desc: str = "scoring") -> list[Scored]:
    """Score every (context, continuation) request; results in input order."""
    encoded = [encode_pair(tokenizer, c, k, max_length) for c, k in requests]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[Scored | None] = [None] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = order[start: start + batch_size]
        width = max(len(encoded[i][0]) for i in chunk) - 1  # inputs drop the last token
        inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = encoded[i][0]
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        # the LM head runs only where a continuation token is predicted (~20% of the FLOPs saved)
        hidden = model.get_decoder()(input_ids=inputs.to(device), use_cache=False).last_hidden_state  # [B, W, D]
        head = model.get_output_embeddings()
        for row, i in enumerate(chunk):
            ids, cont_len = encoded[i]
            results[i] = _score_row(hidden[row], head, ids, cont_len)
    return results  # type: ignore[return-value]


def _score_row(hidden: torch.Tensor, head: torch.nn.Module, ids: list[int], cont_len: int) -> Scored:
    """hidden [W, D] of one padded row; the continuation is the last cont_len ids."""
    n = len(ids)
    positions = torch.arange(n - 1 - cont_len, n - 1)  # states that predict the continuation
    logprobs = torch.log_softmax(head(hidden[positions]).float(), dim=-1)  # [C, V]
    target = torch.tensor(ids[n - cont_len:])
    picked = logprobs.gather(1, target[:, None]).squeeze(1)
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return Scored(logprob=float(picked.sum()), greedy=greedy, tokens=cont_len)


def multiple_choice_accuracy(items: Sequence[MultipleChoiceItem], scores: Sequence[Scored]) -> tuple[float, float]:
    """(acc, acc_norm) from scores laid out item by item, choice by choice."""
    correct = correct_norm = 0
    pos = 0
    for item in items:
        chunk = scores[pos: pos + len(item.continuations)]
        pos += len(item.continuations)
        raw = [s.logprob for s in chunk]
        norm = [s.logprob / max(1, len(c)) for s, c in zip(chunk, item.continuations)]
        correct += int(max(range(len(raw)), key=raw.__getitem__) == item.label)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.label)
    return correct / len(items), correct_norm / len(items)


def evaluate_task(model, tokenizer, task: str, limit: int | None = None, batch_size: int = 8,
                  progress: bool = True) -> TaskResult:
    """Accuracy of ``model`` on ``task`` (first ``limit`` items, all by default)."""
    start = time.perf_counter()
    items = load_task(task, limit=limit)
    if items and isinstance(items[0], CompletionItem):
        scores = score_requests(model, tokenizer, [(it.context, it.continuation) for it in items],
                                batch_size, progress=progress, desc=task)
        acc = sum(s.greedy for s in scores) / len(items)
        return TaskResult(task, acc, None, len(items), time.perf_counter() - start)
    requests = [(ctx, cont) for it in items for ctx, cont in zip(it.contexts, it.continuations)]
    scores = score_requests(model, tokenizer, requests, batch_size, progress=progress, desc=task)
    acc, acc_norm = multiple_choice_accuracy(items, scores)
    return TaskResult(task, acc, acc_norm, len(items), time.perf_counter() - start)


def seven_task_average(results: dict[str, TaskResult]) -> float | None:
    """Mean ``acc`` over the seven tasks the pruning papers report, if all were run."""
    if not all(t in results for t in SEVEN_TASKS):
        return None
    return sum(results[t].acc for t in SEVEN_TASKS) / len(SEVEN_TASKS)
