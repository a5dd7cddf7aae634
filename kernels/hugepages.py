"""Weights in transparent huge pages: one anonymous mapping, advised ``MADV_HUGEPAGE``, holding every tensor a
decode step streams.

Why: decoding at small batch reads every weight once per step, so a step walks a few hundred MB of memory.
In 4 KiB pages that is tens of thousands of page walks a step, each a two-level walk on a virtual machine,
and the stream prefetchers stop at every page boundary. On this project's 2-core Zen 4 VM (transparent huge
pages in ``madvise`` mode, the common default) moving a SmolLM2 engine's weights into 2 MiB pages made a
dense decode step 1.24-1.35x faster and a FLAP 50% step 1.27x, a 70%-sparse one 1.02-1.04x (the sparse
kernel was then bound by its arithmetic; since the expand fix in bitmask_linear.cpp it reads memory about as
fast as the dense GEMV). See the README, Serving.

Contract: :func:`place_in_huge_pages` moves the storage of each given CPU tensor into one mapping (64-byte
aligned slots, the mapping 2 MiB aligned; tensors viewing the same memory share a slot) and keeps the
tensors themselves, so every holder (modules, packed weights, the compiled decoder) sees the new memory;
values are unchanged. Where the platform cannot
(no ``madvise``, transparent huge pages ``never``) it moves nothing and returns the reason instead. Whether
the kernel then backs the mapping with huge pages is its choice (``AnonHugePages`` in /proc/meminfo tells).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

HUGE_PAGE = 2 * 2**20
SLOT_ALIGN = 64  # a cache line: each tensor starts on one, as torch's own allocator places them
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class HugePageArena:
    """The mapping that holds the placed tensors (they keep it alive too) and how many bytes they take."""

    mapping: mmap.mmap
    nbytes: int
    tensors: int


def why_no_huge_pages() -> str:
    """Empty when weights can be placed in huge pages here, else the reason."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this platform has no madvise(MADV_HUGEPAGE)"
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return f"{THP_SETTING} is missing (no transparent huge pages)"
    return "transparent huge pages are disabled ([never])" if "[never]" in setting else ""


def _slots(tensors: list[Tensor]) -> tuple[list[int], int]:
    """Byte offsets of each tensor's slot and the total, each slot rounded up to SLOT_ALIGN."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // SLOT_ALIGN) * SLOT_ALIGN
    return offsets, total


def _distinct(tensors: list[Tensor]) -> list[list[Tensor]]:
    """The tensors grouped by the memory they view (an LM head tied to the embedding is one group)."""
    groups: dict[tuple[int, int, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.data_ptr(), t.numel() * t.element_size(), t.dtype), []).append(t)
    return list(groups.values())


def place_in_huge_pages(tensors: list[Tensor]) -> HugePageArena | str:
    """Move each tensor's storage into one huge-page mapping (see the module docstring); contiguous CPU
    tensors, those viewing the same memory sharing one slot. Returns the arena, or why nothing was moved."""
    reason = why_no_huge_pages()
    if reason:
        return reason
    if not tensors:
        return "no tensors to place"
    bad = [tuple(t.shape) for t in tensors if t.device.type != "cpu" or not t.is_contiguous()]
    if bad:
        raise ValueError(f"only contiguous CPU tensors can be placed in huge pages; got shapes {bad[:3]} that are not")
    groups = _distinct(tensors)
    offsets, total = _slots([g[0] for g in groups])
    mapping = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(mapping, dtype=torch.uint8)  # its storage holds the mapping alive
    start = -memory.data_ptr() % HUGE_PAGE
    with torch.no_grad():
        for group, offset in zip(groups, offsets):
            first = group[0]
            nbytes = first.numel() * first.element_size()
            slot = memory[start + offset: start + offset + nbytes].view(first.dtype)
            slot.copy_(first.reshape(-1))
            for t in group:
                t.set_(slot.untyped_storage(), slot.storage_offset(), t.shape, t.stride())
    release_freed_memory()
    return HugePageArena(mapping, total, len(groups))


def release_freed_memory() -> None:
    """Hand the heap memory the moved tensors freed back to the system where glibc can (``malloc_trim``):
    glibc keeps freed blocks below its adaptive mmap threshold in its heap, so without this the old copies
    still count in the process's resident memory (SmolLM2 dense: 957 -> 815 MB; 693 MB never placed)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
