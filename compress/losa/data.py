"""Fine-tuning data for LoSA: plain text windows or instruction JSONL rendered with the chat template.

Contract: :func:`open_training_data` turns the recipe's ``data`` string into a
:class:`TrainingData` whose ``batches(round_index, count, batch_size)`` is
deterministic in (seed, round), so a resumed run sees the same batches. A
batch is ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]`` (label
-100 = no loss).

- ``text`` (default): a text split name (``calibration``, never ``eval``), a
  ``.txt`` file or a ``.jsonl`` of ``{"text": ...}``: random windows of
  ``seq_len`` tokens of the token stream (:func:`compress.data.calibration_batch`);
  every token is learned.
- ``instructions``: a ``.jsonl`` whose records are Alpaca style
  (``instruction``, optional ``input``, ``output``) or chat style
  (``messages``: ``[{"role", "content"}, ...]`` ending with the assistant).
  Each record is rendered with the tokenizer's chat template; only the final
  assistant message is learned unless ``train_on_prompt``. Sequences are cut
  at ``seq_len`` and padded per batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from compress.data.text import calibration_batch

IGNORE = -100
Batch = dict[str, Tensor]  # input_ids, attention_mask, labels: [B, T]
Messages = list[dict[str, str]]


class TrainingData(Protocol):
    """Where a round's fine-tuning batches come from."""

    kind: str

    def batches(self, round_index: int, count: int, batch_size: int) -> list[Batch]:
        """``count`` batches of ``batch_size`` sequences for round ``round_index`` (0-based)."""
        ...


def _round_seed(seed: int, round_index: int) -> int:
    return 1_000_003 * (seed + 1) + round_index


# -- plain text -------------------------------------------------------------------------


@dataclass
class TextData:
    """Random token windows of a text source; labels are the inputs."""

    tokenizer: Any
    source: str
    seq_len: int
    seed: int = 0
    kind: str = "text"

    def batches(self, round_index: int, count: int, batch_size: int) -> list[Batch]:
        if count == 0:
            return []
        ids = calibration_batch(self.tokenizer, count * batch_size, self.seq_len,
                                _round_seed(self.seed, round_index), self.source)  # [count * B, T]
        return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
                for chunk in ids.split(batch_size)]


# -- instructions ---------------------------------------------------------------------------


def _check_messages(messages: Any, where: str) -> Messages:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (it is what is learned), "
                         f"got role {messages[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _alpaca_messages(record: dict, where: str) -> Messages:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: an Alpaca record needs a string {key!r}")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError(f"{where}: 'input' must be a string")
    prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def parse_instruction(record: Any, where: str = "record") -> Messages:
    """One JSONL record (Alpaca ``instruction``/``input``/``output`` or chat ``messages``) -> messages."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _check_messages(record["messages"], where)
    if "instruction" in record:
        return _alpaca_messages(record, where)
    raise ValueError(f"{where}: expected 'messages' (chat) or 'instruction'/'input'/'output' (Alpaca); "
                     f"got keys {sorted(record)}")


def read_instructions(path: str | Path) -> list[Messages]:
    """Every record of an instruction JSONL file as a message list (errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"instruction file {path} does not exist")
    out: list[Messages] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            out.append(parse_instruction(record, where))
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def render(tokenizer: Any, messages: Messages, seq_len: int, train_on_prompt: bool = False) -> tuple[Tensor, Tensor]:
    """(ids [T], labels [T]) of one conversation through the chat template, cut at ``seq_len`` tokens.

    The prompt is everything before the final assistant message plus the generation prompt; its
    tokens get label -100 unless ``train_on_prompt``. Token boundaries come from the offsets of the
    whole rendered text, so a BPE merge across the boundary cannot shift the labels.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; instruction data needs one (or use text data)")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"][:seq_len], dtype=torch.long)  # [T]
    starts = torch.tensor([start for start, _ in enc["offset_mapping"][:seq_len]])  # [T]
    labels = ids.clone() if train_on_prompt else torch.where(starts >= len(prompt), ids, IGNORE)
    return ids, labels


def pad_batch(items: list[tuple[Tensor, Tensor]], pad_id: int) -> Batch:
    """Right-pad (ids, labels) pairs to the longest: [B, T] ids, mask and labels (-100 on padding)."""
    width = max(ids.numel() for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (i, lab) in enumerate(items):
        ids[row, :i.numel()], labels[row, :i.numel()], mask[row, :i.numel()] = i, lab, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class InstructionData:
    """Conversations from a JSONL file, shuffled per round (cycled when a round needs more)."""

    tokenizer: Any
    source: str
    seq_len: int
    seed: int = 0
    train_on_prompt: bool = False
    kind: str = "instructions"

    def __post_init__(self) -> None:
        self.records = read_instructions(self.source)
        render(self.tokenizer, self.records[0], self.seq_len, self.train_on_prompt)  # fail early
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _examples(self, round_index: int):
        gen = torch.Generator().manual_seed(_round_seed(self.seed, round_index))
        while True:
            for k in torch.randperm(len(self.records), generator=gen).tolist():
                ids, labels = render(self.tokenizer, self.records[k], self.seq_len, self.train_on_prompt)
                if bool((labels != IGNORE).any()):  # a prompt longer than seq_len leaves nothing to learn
                    yield ids, labels

    def batches(self, round_index: int, count: int, batch_size: int) -> list[Batch]:
        stream = self._examples(round_index)
        return [pad_batch([next(stream) for _ in range(batch_size)], self.pad_id) for _ in range(count)]


def _is_instruction_file(source: str) -> bool:
    path = Path(source)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return True  # let read_instructions name the bad line
    return isinstance(record, dict) and ("messages" in record or "instruction" in record)


def open_training_data(source: str, tokenizer: Any, seq_len: int, seed: int = 0,
                       train_on_prompt: bool = False) -> TrainingData:
    """Instruction data for an instruction JSONL file, text windows for anything else."""
    if source == "eval":
        raise ValueError("the eval split is for evaluation only; train on 'calibration' or your own file")
    if _is_instruction_file(source):
        return InstructionData(tokenizer, source, seq_len, seed, train_on_prompt)
    return TextData(tokenizer, source, seq_len, seed)
