"""CPU implementations of ``bitmask_linear``: an AVX-512 kernel that reads the compressed weight, and a
portable dense fallback.

Contract:

* ``cpu_avx512`` (priority 10; bf16) needs a CPU with AVX512-F/BW/VL, AVX512-BF16, AVX512-VBMI and AVX512-VBMI2
  and a C++ compiler: the extension ``bitmask_linear.cpp`` is compiled on first use with torch's
  extension machinery and cached under ``$SPARSE_SERVE_CACHE/torch_extensions`` (default
  ``~/.cache/sparse-serve``), so later processes load it in a fraction of a second. ``pack``
  regroups the bitmask into one uint32 word per 32 columns and pads the values; no weight is
  kept dense; it also counts the 64-column windows holding more than 32 nonzeros and marks the
  weight ``windowed`` when they are rare (at most ``window_max_overfull``, true from ~60% sparsity).
  ``apply`` runs the decode kernel for up to ``decode_rows(K)`` activation rows, in passes of up to 8
  rows, each with the loop :func:`decode_plan` names for its size (measured on the machine once per
  process): each 32-column chunk expanded in a register, one weight row at a time or several in
  flight, or for a windowed weight each window's column indices compressed from its mask and the
  activations permuted to the packed values (``vdpbf16ps`` every way). Up to ``panels_max_rows`` rows
  take the panel GEMM: a register-blocked GEMM on panels of a few weight rows expanded a chunk at a
  time into a small buffer; or, for a weight whose share of nonzero column pairs is at most
  ``pairs_max_density`` (``PackedBitmask.pair_density``; from ~82% sparsity), up to ``pairs_max_rows``
  rows, the pair gather: only the nonzero pairs are multiplied, each with 16 activation rows at once.
  More rows (prefill) decompress the weight into one reused scratch buffer in oneDNN's own prepacked form
  (:func:`blocked_weight`, checked per shape by :func:`blocked_form`) and run oneDNN's GEMM on it, bit for bit
  its GEMM on the dense weight; where oneDNN prepacks otherwise, or the weight exceeds ``blocked_max_bytes``,
  into a row-major buffer (whole, or tiles within ``tile_bytes``) for a plain dense GEMM.
* ``cpu_dense`` (priority 5; every float dtype) is the fallback on any CPU: ``pack`` decompresses
  once and prepacks the weight for oneDNN, ``apply`` runs :func:`dense_linear`, so a machine without
  AVX-512 is no slower than dense (nor smaller).
* :func:`dense_linear` is also the dense path of the serving engine: the extension's AVX-512 dense
  GEMV (``dense_gemm_decode``, a plain-load twin of the decode kernel) for up to
  a few rows when the weight was kept row-major (``prepack_dense(decode_rows=True)``;
  ``CpuTuning.dense_decode_rows``: how many rows depends on the weight's shape), then up to
  ``blocked_gemm_max_rows`` the extension's blocked GEMM (``dense_gemm_blocked``), which reads oneDNN's
  prepacked weight in place where it is in the blocked form (no copy), and oneDNN's prepacked linear above.
  A weight whose high bytes take at most 16 values is kept exponent-coded for the GEMV
  instead (``coded_gemm_decode``, :mod:`kernels.exponent_coding`): lossless, 0.75x the bytes, the same sums.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.bitmask import BitmaskTensor, bitmask_words, word_popcounts
from kernels.exponent_coding import CodedWeight, code_exponents
from kernels.registry import Kernel, register

log = logging.getLogger(__name__)

CHUNK = 32  # bf16 lanes of one AVX-512 register
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi", "avx512_vbmi2", "avx512_vnni",
                  "bmi2")
SOURCE = Path(__file__).with_name("bitmask_linear.cpp")
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi", "-mavx512vbmi2",
          "-mavx512vnni", "-mpopcnt", "-mbmi2"]


# -- availability --------------------------------------------------------------------------------
@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def missing_flags() -> list[str]:
    return [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]


def extension_dir() -> Path:
    root = Path(os.environ.get("SPARSE_SERVE_CACHE", Path.home() / ".cache" / "sparse-serve"))
    path = root / "torch_extensions" / f"torch-{torch.__version__.replace('+', '-')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_extension(name: str, source: Path | list[Path], cflags: list[str]) -> ModuleType | str:
    """Compile ``source`` (one file, or several linked into one module) once, cached in its own directory
    under :func:`extension_dir` (two extensions may compile one source with different flags) and rebuilt
    when any of them changes; or say why it failed: a compiler error must not break loading, the
    fallbacks serve."""
    from torch.utils.cpp_extension import load

    sources = source if isinstance(source, list) else [source]
    build = extension_dir() / name
    build.mkdir(exist_ok=True)
    try:
        with build_lock(build):
            return load(name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
                        extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as err:  # noqa: BLE001 - reported as the reason, the caller falls back
        return f"compiling {sources[0].name} failed ({type(err).__name__}: {str(err)[-300:]})"


TORCH_BATON = "lock"  # the file torch's ``load`` creates in the build directory while it compiles


@contextlib.contextmanager
def build_lock(build: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``build/.build.lock`` for a build.

    torch's ``load`` guards a build with a plain file (:data:`TORCH_BATON`) that it deletes when done; a
    build killed mid-way (SIGKILL, a machine restart) leaves it behind, and every later ``load`` of that
    extension then waits for it forever. A ``flock`` is dropped by the kernel when its holder dies, so it
    cannot go stale; and while it is held no other build of ours runs in ``build``, so a baton found then
    is a dead build's and is removed."""
    with open(build / ".build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            baton = build / TORCH_BATON
            if baton.exists():
                log.warning("removing %s, left by a build that did not finish", baton)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def extension() -> ModuleType | str:
    """The compiled extension, or the reason it cannot be had (built once, then cached on disk)."""
    if missing_flags():
        return f"this CPU lacks {missing_flags()}"
    return build_extension("sparse_serve_bitmask_cpu", SOURCE, CFLAGS)


@functools.cache
def decoder_extension() -> ModuleType | str:
    """The compiled decoder stack (``decoder.cpp``, linked with this kernel and the fused layer ops), or the
    reason it cannot be had."""
    if missing_flags():
        return f"this CPU lacks {missing_flags()}"
    sources = [SOURCE.with_name(name) for name in ("decoder.cpp", "bitmask_linear.cpp", "fused_ops.cpp")]
    return build_extension("sparse_serve_decoder_cpu", sources, CFLAGS + ["-DSPARSE_SERVE_NO_MODULE"])


def avx512_available() -> bool:
    return not isinstance(extension(), str)


def avx512_unavailable_reason() -> str:
    ext = extension()
    return ext if isinstance(ext, str) else ""


# -- the AVX-512 kernel --------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedBitmask:
    """A bitmask weight regrouped for the AVX-512 kernel (see bitmask_linear.cpp for the layout)."""

    shape: tuple[int, int]  # (N, K)
    masks: Tensor  # int32 [N, ceil(K/32)]
    values: Tensor  # bf16 [nnz + 32]
    row_offsets: Tensor  # int64 [N]
    windowed: bool = False  # few 64-column windows hold more than 32 nonzeros: decode takes the windowed loop
    pair_density: float = 1.0  # the share of column pairs (2j, 2j+1) holding a nonzero: what the pair gather multiplies

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.masks, self.values, self.row_offsets))


def pack_avx512(weight: BitmaskTensor) -> PackedBitmask:
    values = torch.cat([weight.values.to("cpu", torch.bfloat16), torch.zeros(CHUNK, dtype=torch.bfloat16)])
    bitmask = weight.bitmask.cpu()
    windowed = overfull_windows(bitmask) <= TUNING.window_max_overfull
    return PackedBitmask(weight.shape, bitmask_words(bitmask, weight.cols).contiguous(), values,
                         weight.row_offsets.to("cpu", torch.int64).contiguous(), windowed, pair_density(bitmask))


def pair_density(bitmask: Tensor) -> float:
    """The share of column pairs (2j, 2j+1) with at least one nonzero: uint8 bitmask [N, ceil(K/8)] -> [0, 1].
    Counted over whole bytes (4 pairs each); the zero padding bits of the last byte count as empty pairs."""
    if bitmask.numel() == 0:
        return 0.0
    pairs = (bitmask | (bitmask >> 1)) & 0x55  # bit 2j set: pair j of the byte holds a nonzero
    return int(word_popcounts(pairs, 8 * bitmask.shape[1]).sum()) / (4 * bitmask.numel())


def overfull_windows(bitmask: Tensor) -> float:
    """The fraction of 64-column windows holding more than 32 nonzeros (each costs the windowed decode
    loop a second permute and a mispredicted branch). uint8 bitmask [N, ceil(K/8)] -> a number in [0, 1]."""
    words = word_popcounts(bitmask, 8 * bitmask.shape[1])  # [N, KW] nonzeros per 32 columns
    counts = F.pad(words, (0, words.shape[1] % 2)).view(bitmask.shape[0], -1, 2).sum(-1)  # [N, W] per window
    return float((counts > 32).float().mean()) if counts.numel() else 0.0


@dataclass
class CpuTuning:
    """Where the AVX-512 kernel hands over to decompress + dense GEMM, measured on Zen 4: decoding (in
    passes of 8 rows) beat the GEMM up to 16 rows (the panels now take over earlier, below). Above that the
    weight is decompressed into a reused scratch buffer of up to ``tile_bytes`` and multiplied in one GEMM:
    at 40 prompt rows one GEMM on the whole decompressed weight ran 1.7-1.9x faster than 256-row tiles
    (SmolLM2's shapes, see benchmarks/kernels.py). ``tile_rows`` overrides the rows per tile (the tests use
    it). Only weights whose share of 64-column windows with more than 32 nonzeros is at most ``window_max_overfull`` may
    take the windowed decode loop (bitmask_linear.cpp). Which decode loop is fastest depends on the
    machine, not only the CPU model: on one Zen 4 VM the windowed loop was 1.3-1.9x faster than the
    expanding ones at one row and 70% sparsity and the streaming loop beat rows in flight by 1.2-1.8x;
    on another, same model, rows in flight was 1.5x faster than streaming and 1.9x faster than windowed
    at one row, while windowed still won at two. So ``decode_plan=None`` (the default) measures them
    once per process (:func:`decode_plan`); a :class:`DecodePlan` fixes them.
    From ``decode_max_rows`` + 1 to ``panels_max_rows`` rows the panel GEMM runs (bitmask_linear.cpp):
    0.84-1.21x and 0.90-1.16x (two runs) of oneDNN's prepacked GEMM at 32 and 64 rows, 50-80% sparsity,
    SmolLM2's and LLaMA-7B's shapes (benchmarks/kernels.py, weights from memory), where the pair gather
    and decompress + GEMM had run 0.42-1.18x. At 16 rows it ran 0.84-1.08x at 70% and 0.86-1.04x at 50%
    against the decode kernel's 0.76-1.19x and 0.73-1.02x (same process): better on the 4096-wide
    shapes at 50%, worse on SmolLM2's at 70%. Measured again at 9-16 rows (same process, 50% and 70%):
    on weights more than ``wide_cols`` columns wide (3072-11008) the panels matched or beat the decode
    kernel from 14 rows (0.82-1.22x against 0.67-1.11x) and lost below (at 13 rows and 70%, 0.80-0.93x
    against 0.76-1.14x; at 9 rows 0.71-0.79x against 0.77-1.21x); on 576-2048 columns the decode kernel
    won up to 16 rows but for 2048x2048 at 50%. With the masks prefetched in the panels and 9-10 rows
    decoded in one pass (bitmask_linear.cpp), measured again on 4096-11008 columns at 8-16 rows (two
    threads, same process): at 9-10 rows the decode kernel ran 0.97-1.49x the panels' speed (below 1x
    only at 50% and 10 rows), at 11-12 rows (passes of 8) the panels won on 10 of 12 points. So the
    decode kernel takes up to ``decode_max_rows`` rows, and up to ``wide_decode_max_rows`` on wider
    weights (:meth:`decode_rows`). Once the panels prefetched the next panel (``NextRowsAhead`` in
    bitmask_linear.cpp; 1.03-1.42x at 16-48 rows on short weight rows), on 576-2048 columns (1536x576,
    576x1536, 2048x2048; two threads, 50% and 70%, same process, throwaway script) the panels ran 0.90-1.17x
    the decode kernel's speed at 12 rows (three of six points under 1x), 1.04-1.29x at 14 rows and 1.13-1.40x
    at 16: ``decode_max_rows`` went from 16 to 12. Once passes of 8 rows and more went span by span (the
    passes after the first read a span of ~256 KiB from L2; 1.02-1.14x at 11-16 rows on 4096-11008 columns),
    the panels ran 0.88-0.97x the decode kernel's speed at 11 rows on 4096x4096, 11008x4096 and 4096x11008
    (six of six points; 0.90-1.10x at 12 rows, 0.97-1.13x at 13): ``wide_decode_max_rows`` went from 10 to
    11. Weights
    with at most ``pairs_max_density`` nonzero column pairs (random masks: 0.36 at 80% sparsity, 0.28
    at 85%, 0.19 at 90%) take the pair gather instead, which multiplies only those: the two tied at 80%,
    the pair gather won at 85% (1.02-1.04x against 0.90-0.96x) and 90% (1.35-1.52x against 0.98x).
    Beyond 64 rows decompress + GEMM had won (0.78-0.88x against the panels' 0.77-0.79x at 128-256 rows).
    Measured again with the masks prefetched in the panels (same process, two threads, 50% and 70%,
    throwaway script), against oneDNN's prepacked GEMM: at 96-128 rows the panels ran 0.85-1.02x and
    decompress + GEMM 0.73-0.89x on SmolLM2's shapes and 4096x4096, 11008x4096 and 4096x11008; at 192
    rows 0.87-1.00x against 0.84-0.90x (4096x4096: 0.87x both); at 256 rows decompress + GEMM won on
    the wide shapes (0.83-0.89x against 0.83-0.88x) and lost on SmolLM2's (0.85-0.90x against
    0.89-1.00x). So the panels take up to ``panels_max_rows`` = 192 rows. At 85% sparsity the pair
    gather ran 1.11-1.35x up to 256 rows (decompress + GEMM 0.82-0.91x) and 0.85-0.98x at 512
    (0.90-0.94x): it takes up to ``pairs_max_rows`` = 256.

    Decompress + GEMM then moved to oneDNN's prepacked form (``bitmask_decompress_blocked``; oneDNN's GEMM on a
    plain row-major weight reorders it inside every call). Same process, alternating, 50% and 70%, SmolLM2's
    and the 4096-wide shapes, against oneDNN on its own prepacked weight (throwaway script): 0.88-0.96x at 256
    rows against the row-major path's 0.79-0.93x, 0.94-0.98x at 512 against 0.83-0.93x. At 128 rows it ran
    0.80-0.91x against the panels' 0.90-0.98x, at 192 0.86-0.95x against 0.85-0.96x (the panels ahead on
    SmolLM2's shapes), so ``panels_max_rows`` stays. The form needs one scratch buffer as large as the largest
    such weight: up to ``blocked_max_bytes`` (256 MiB: every linear of a 7B LLaMA, gate and up fused).

    The dense decode GEMV (``dense_gemm_decode``, ``coded_gemm_decode``) against oneDNN's prepacked linear,
    weights from memory, two threads (throwaway scripts): at one row 1.15-2.4x on every shape. At two rows
    1.4-2.2x on SmolLM2's decoder linears (576 and 1536 columns), 0.78-1.14x on 4096 and 11008 columns; at
    three to eight rows 0.35-1.5x, below 1x on most shapes. SmolLM2's LM head (49152 x 576, exponent-coded)
    kept winning longer: 2.06x at two rows, 1.46-1.69x at three and four, 1.18-1.31x at five and six, 1.16x
    at seven, 0.99x at eight. So the GEMV takes up to ``dense_decode_max_rows`` = 2 rows, one on weights more
    than ``wide_cols`` columns wide, and up to ``tall_dense_decode_max_rows`` = 6 on weights of at least
    ``tall_rows`` output rows (a vocabulary: oneDNN splits so tall a weight poorly at a few rows) that are
    not wide (:meth:`dense_decode_rows`).

    Past the GEMV's rows a dense weight takes the blocked GEMM (``dense_gemm_blocked``) on oneDNN's own
    prepacked weight, read in place, up to ``blocked_gemm_max_rows``: oneDNN's GEMM is slow at few rows (60-200
    of the two cores' ~400 GFLOPS at 4-16 rows on SmolLM2's linears). Against it, weights from memory, two
    threads (throwaway script, random weights): 1.12-1.85x at 3-64 rows on SmolLM2's decoder shapes, 1.0-1.35x
    on the 4096-wide shapes, 0.96-1.01x at 96 rows, so 64. At one row it ran 0.86-1.6x the GEMV's speed with
    both in 4 KiB pages, but in an engine (the GEMV's weights in huge pages, oneDNN's not) a dense decode step
    with the blocked GEMM at one row ran 0.82x as fast (9.38 against 7.61 ms, same process); at two rows they
    tied, so the GEMV keeps its rows."""

    decode_max_rows: int = 12
    wide_cols: int = 2048
    wide_decode_max_rows: int = 11
    panels_max_rows: int = 192
    pairs_max_rows: int = 256
    pairs_max_density: float = 0.33
    dense_decode_max_rows: int = 2
    tall_rows: int = 16384
    tall_dense_decode_max_rows: int = 6
    code_exponents: bool = True
    decode_plan: DecodePlan | None = None
    window_max_overfull: float = 0.15
    tile_bytes: int = 64 * 2**20
    tile_rows: int | None = None
    blocked_max_bytes: int = 256 * 2**20
    blocked_gemm_max_rows: int = 64

    def decode_rows(self, k: int) -> int:
        """The most activation rows the decode kernel takes for a weight ``k`` columns wide."""
        return self.decode_max_rows if k <= self.wide_cols else min(self.decode_max_rows, self.wide_decode_max_rows)

    def dense_decode_rows(self, n: int, k: int) -> int:
        """The most activation rows the dense decode GEMV takes for an [n, k] weight (oneDNN above)."""
        if k > self.wide_cols:
            return 1
        return self.tall_dense_decode_max_rows if n >= self.tall_rows else self.dense_decode_max_rows

    def rows_per_tile(self, n: int, k: int) -> int:
        return self.tile_rows or min(n, max(CHUNK, self.tile_bytes // (2 * k)))


TUNING = CpuTuning()
ENV_DECODE_LOOP = "SPARSE_SERVE_DECODE_LOOP"
LOOPS = {"rows": 0, "stream": 1, "window": 2}  # the decode loops of bitmask_linear.cpp (its Loop codes)
MAX_PASS = 8  # activation rows per decode pass
STREAM_MAX_ACT_BYTES = 12 * 1024  # the streaming loop's activation budget (kStreamMaxActBytes)


@dataclass(frozen=True)
class DecodePlan:
    """The decode loop (a ``LOOPS`` code) for passes of 1 .. 8 activation rows, for windowed weights and
    for the others (which cannot take the windowed loop)."""

    windowed: tuple[int, ...]
    plain: tuple[int, ...]

    @classmethod
    def uniform(cls, loop: str) -> "DecodePlan":
        """One loop for every pass (the windowed one only for windowed weights; rows in flight otherwise)."""
        code = LOOPS[loop]
        return cls((code,) * MAX_PASS, ((code if loop != "window" else LOOPS["rows"]),) * MAX_PASS)

    def names(self) -> dict[str, list[str]]:
        by_code = {code: name for name, code in LOOPS.items()}
        return {"windowed": [by_code[c] for c in self.windowed], "plain": [by_code[c] for c in self.plain]}


def decode_plan() -> DecodePlan:
    """The decode loops this process uses: ``TUNING.decode_plan`` if set, else ``$SPARSE_SERVE_DECODE_LOOP``
    (``rows``, ``stream`` or ``window``: that loop wherever it applies, for reproducible runs; read at the
    first decode, :func:`forget_decode_env` reads it again), else the fastest measured on this machine
    (:func:`calibrated_decode_plan`, once per process). Called on every decode, so it reads no environment."""
    if TUNING.decode_plan is not None:
        return TUNING.decode_plan
    return forced_decode_plan() or calibrated_decode_plan()


@functools.cache
def forced_decode_plan() -> DecodePlan | None:
    """The plan ``$SPARSE_SERVE_DECODE_LOOP`` forces (None when unset or ``auto``), read once per process."""
    forced = os.environ.get(ENV_DECODE_LOOP, "").strip()
    if not forced or forced == "auto":
        return None
    if forced not in LOOPS:
        raise ValueError(f"${ENV_DECODE_LOOP}={forced!r} is not a decode loop; use one of {sorted(LOOPS)} or auto")
    return DecodePlan.uniform(forced)


def forget_decode_env() -> None:
    """Read ``$SPARSE_SERVE_DECODE_LOOP`` again at the next decode (the measured plan stays cached)."""
    forced_decode_plan.cache_clear()


@functools.cache
def calibrated_decode_plan(rows: int = 32768, cols: int = 2048, rounds: int = 5) -> DecodePlan:
    """The fastest decode loop for passes of 1, 2 and 4 activation rows on this machine, timed as decoding
    runs: on a random 75%-sparse ``rows`` x ``cols`` weight of ~42 MB, more than the L3 cache, so every
    call reads it from memory (timed in cache instead, rows in flight wins where it loses 2x from memory).
    Its windows qualify for the windowed loop and the streaming loop fits 1-3 of its activation rows in L1.
    The candidates alternate for ``rounds`` rounds, the fastest call of each counts (~0.3 s, once per
    process). Passes of 3-8 rows take the 2-row choice, the windowed loop only up to 4 rows."""
    packed = random_packed(rows, cols, torch.Generator().manual_seed(0))
    decode = extension().bitmask_gemm_decode
    best: dict[int, dict[str, float]] = {}
    for m in (1, 2, 4):
        x = torch.randn(m, cols).bfloat16()
        names = ["rows", "window"] + (["stream"] if m * cols * 2 <= STREAM_MAX_ACT_BYTES else [])
        best[m] = {name: float("inf") for name in names}
        for _ in range(rounds):
            for name in names:
                start = time.perf_counter()
                decode(x, packed.masks, packed.values, packed.row_offsets, None, [LOOPS[name]] * MAX_PASS)
                best[m][name] = min(best[m][name], time.perf_counter() - start)

    def fastest(m: int, windowed: bool) -> int:
        times = {name: t for name, t in best[m].items() if windowed or name != "window"}
        return LOOPS[min(times, key=times.__getitem__)]

    # passes of 3-8 rows: the 2-row choice between streaming and rows in flight (streaming falls back to
    # rows in flight where the pass exceeds its budget, as it does at 4 rows of this weight); windowed
    # weights take the windowed loop for 2-4 rows where it won there
    plain = (fastest(1, False),) + (fastest(2, False),) * (MAX_PASS - 1)
    window = LOOPS["window"]
    windowed = tuple(window if m <= 4 and fastest(measured, True) == window else plain[m - 1]
                     for m, measured in zip(range(1, MAX_PASS + 1), (1, 2, 2, 4, 4, 4, 4, 4)))
    return DecodePlan(windowed, plain)


def random_packed(rows: int, cols: int, gen: torch.Generator) -> PackedBitmask:
    """A random 75%-sparse packed weight built word by word (each mask bit the AND of two random bits), so
    a weight larger than the caches costs no dense tensor. ``cols`` must be a multiple of 32."""
    def random_bytes() -> Tensor:
        return torch.randint(0, 256, (rows, cols // 8), dtype=torch.uint8, generator=gen)

    bitmask = random_bytes() & random_bytes()  # uint8 [rows, cols/8]
    counts = word_popcounts(bitmask, cols).sum(1)  # [rows] nonzeros per row
    values = torch.randn(int(counts.sum()) + CHUNK, generator=gen).bfloat16()
    return PackedBitmask((rows, cols), bitmask_words(bitmask, cols).contiguous(), values,
                         torch.cumsum(counts, 0) - counts, True)


def decompress_rows(packed: PackedBitmask, begin: int, end: int, out: Tensor | None = None) -> Tensor:
    """Dense bf16 rows [begin, end) of ``packed``: [end - begin, K] (into ``out`` when given)."""
    out = torch.empty(end - begin, packed.shape[1], dtype=torch.bfloat16) if out is None else out
    extension().bitmask_decompress_into(packed.masks, packed.values, packed.row_offsets, begin, end, out)
    return out


def _scratch_for(rows: int, cols: int) -> Tensor:
    """A [rows, cols] view of one buffer shared by every weight (layers run one at a time), grown on demand."""
    global _SHARED
    if _SHARED.numel() < rows * cols:
        _SHARED = torch.empty(rows * cols, dtype=torch.bfloat16)
    return _SHARED[: rows * cols].view(rows, cols)


_SHARED = torch.empty(0, dtype=torch.bfloat16)


@dataclass(frozen=True)
class BlockedForm:
    """oneDNN's prepacked form of a bf16 [N, K] linear weight, where it is the blocked form
    ``bitmask_decompress_blocked`` writes (rows in blocks of 64, each block column pair by column pair)."""

    metadata: Tensor  # uint8: oneDNN's serialized memory descriptor
    nbytes: int
    pairs: int  # column pairs a row, K padded


@functools.cache
def blocked_form(n: int, k: int) -> BlockedForm | None:
    """The blocked form of an [n, k] weight, or None where oneDNN prepacks it otherwise (another ISA, e.g. AMX,
    or oneDNN version): a random weight is prepacked once per shape and its bytes compared with the form."""
    probe = torch.randn(n, k, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)  # [N, K]
    prepacked = torch.ops.mkldnn._reorder_linear_weight(probe)
    nbytes, rows = int(torch.ops.mkldnn._nbytes(prepacked)), -(-n // BLOCK_ROWS) * BLOCK_ROWS
    pairs = nbytes // (4 * rows)
    if 4 * rows * pairs != nbytes or pairs < CHUNK // 2 * -(-k // CHUNK):
        return None
    blocks = F.pad(probe, (0, 2 * pairs - k, 0, rows - n)).view(rows // BLOCK_ROWS, BLOCK_ROWS, pairs, 2)
    raw = extension().mkldnn_bytes(prepacked, nbytes).view(torch.bfloat16)  # [blocks * pairs * 64 * 2]
    if not torch.equal(raw.view(rows // BLOCK_ROWS, pairs, BLOCK_ROWS, 2), blocks.transpose(1, 2)):
        return None
    return BlockedForm(torch.ops.mkldnn._get_mkldnn_serialized_md(prepacked), nbytes, pairs)


def blocked_weight(packed: PackedBitmask) -> Tensor | None:
    """``packed`` decompressed into one scratch buffer shared by every weight (layers run one at a time, as for
    the row-major buffer), as an oneDNN weight valid until the next call; None where the shape's form is not
    the blocked one or exceeds ``blocked_max_bytes``."""
    global _BLOCKED
    n, k = packed.shape
    form = blocked_form(n, k) if 2 * n * k <= TUNING.blocked_max_bytes else None
    if form is None or form.nbytes > TUNING.blocked_max_bytes:
        return None
    if _BLOCKED.numel() < form.nbytes:
        _BLOCKED_VIEWS.clear()  # they point into the old buffer
        _BLOCKED = torch.empty(form.nbytes, dtype=torch.uint8)
    ext = extension()
    ext.bitmask_decompress_blocked(packed.masks, packed.values, packed.row_offsets, _BLOCKED, form.pairs)
    view = _BLOCKED_VIEWS.get(packed.shape)
    if view is None:
        view = _BLOCKED_VIEWS[packed.shape] = ext.blocked_weight_view(_BLOCKED, form.metadata, *packed.shape)
    return view


BLOCK_ROWS = 64  # rows of a block of oneDNN's prepacked form (kBlockRows)
_BLOCKED = torch.empty(0, dtype=torch.uint8)
_BLOCKED_VIEWS: dict[tuple[int, int], Tensor] = {}


def apply_avx512(x: Tensor, packed: PackedBitmask, bias: Tensor | None = None) -> Tensor:
    """x [M, K] bf16 -> y [M, N] bf16: decode kernel for few rows, the panel GEMM (or for a very sparse weight
    the pair gather) for a few dozen rows, tiled decompress + GEMM for more."""
    _check_input(x, packed.shape)
    if x.shape[0] <= TUNING.decode_rows(packed.shape[1]):
        plan = decode_plan()
        loops = plan.windowed if packed.windowed else plan.plain  # a tuple: the binding takes any sequence
        return extension().bitmask_gemm_decode(x, packed.masks, packed.values, packed.row_offsets, bias, loops)
    gather, most = many_rows_path(packed)
    if x.shape[0] <= most:
        ext = extension()
        many_rows = ext.bitmask_gemm_pairs if gather else ext.bitmask_gemm_panels
        return many_rows(x, packed.masks, packed.values, packed.row_offsets, bias)
    weight = blocked_weight(packed) if TUNING.tile_rows is None else None
    if weight is not None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    n, k = packed.shape
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    rows = TUNING.rows_per_tile(n, k)
    if rows >= n:  # the whole weight in one tile: one GEMM, no strided output
        tile = decompress_rows(packed, 0, n, _scratch_for(n, k))  # [N, K]
        return F.linear(x, tile, bias)
    scratch = _scratch_for(rows, k)
    for begin in range(0, n, rows):
        end = min(begin + rows, n)
        tile = decompress_rows(packed, begin, end, scratch[: end - begin])  # [tile, K]
        torch.matmul(x, tile.T, out=y[:, begin:end]) if bias is None else \
            torch.addmm(bias[begin:end], x, tile.T, out=y[:, begin:end])
    return y


def many_rows_path(packed: PackedBitmask) -> tuple[bool, int]:
    """Past the decode kernel's rows: whether ``packed`` takes the pair gather (few nonzero column pairs: it
    multiplies fewer) rather than the panels, and the most rows that takes before the weight is decompressed."""
    gather = packed.pair_density <= TUNING.pairs_max_density
    return gather, TUNING.pairs_max_rows if gather else TUNING.panels_max_rows


def _check_input(x: Tensor, shape: tuple[int, int]) -> None:
    if x.dim() != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"x must be [M, {shape[1]}] for a weight of shape {shape}, got {tuple(x.shape)}")


def _float_bias(bias: Tensor | None) -> Tensor | None:
    """The bias as the decode kernels add it: float32, contiguous."""
    return None if bias is None else bias.float().contiguous()


def bind_avx512(packed: PackedBitmask, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """:func:`apply_avx512` for one weight with its lookups done once: decode-sized batches go straight to
    the kernel (the bias already float32, as the kernel adds it), others through ``apply_avx512``."""
    decode = extension().bitmask_gemm_decode
    masks, values, offsets, windowed = packed.masks, packed.values, packed.row_offsets, packed.windowed
    bias32 = _float_bias(bias)

    def forward(x: Tensor) -> Tensor:  # x [M, K] bf16 -> [M, N]
        if x.shape[0] <= TUNING.decode_rows(packed.shape[1]) and x.dim() == 2 and x.shape[1] == packed.shape[1]:
            plan = decode_plan()
            return decode(x, masks, values, offsets, bias32, plan.windowed if windowed else plan.plain)
        return apply_avx512(x, packed, bias)
    return forward


def native_avx512(packed: PackedBitmask, bias: Tensor | None) -> object | None:
    """:func:`bind_avx512`'s paths as a linear of the compiled decoder: the decode kernel (its loops: this
    process's :func:`decode_plan`, fixed now) up to ``TUNING.decode_rows(K)`` rows, then the panels or the
    pair gather as :func:`apply_avx512` picks them, up to where it would decompress."""
    ext = decoder_extension()
    if isinstance(ext, str):
        return None
    plan, (gather, most) = decode_plan(), many_rows_path(packed)
    linear = ext.Linear.sparse(packed.masks, packed.values, packed.row_offsets, _float_bias(bias),
                               list(plan.windowed if packed.windowed else plan.plain),
                               TUNING.decode_rows(packed.shape[1]))
    return linear.with_many_rows(most, gather)


register(Kernel(
    op="bitmask_linear", name="cpu_avx512", priority=10,
    devices=frozenset({"cpu"}), dtypes=frozenset({torch.bfloat16}),
    pack=pack_avx512, apply=apply_avx512, bind=bind_avx512, native=native_avx512,
    available=avx512_available, why_unavailable=avx512_unavailable_reason,
))


# -- the portable fallback: prepacked oneDNN dense -------------------------------------------------
@dataclass(frozen=True)
class PrepackedDense:
    """A dense weight prepacked for oneDNN (or plain, where oneDNN cannot take the dtype), and for the AVX-512
    decode GEMV where that runs: the weight exponent-coded where that is exact (``coded``), else row-major
    bf16 (``rows``). A bf16 weight oneDNN prepacked in the blocked form (``pairs``) is also read in place by
    ``dense_gemm_blocked`` for a few dozen rows."""

    weight: Tensor  # [N, K], opaque when prepacked
    prepacked: bool
    shape: tuple[int, int]
    rows: Tensor | None = None  # [N, K] bf16 contiguous: decode steps read it with dense_gemm_decode
    coded: CodedWeight | None = None  # decode steps read it with coded_gemm_decode (then rows is None)
    pairs: int | None = None  # weight is in the blocked form with this many column pairs a row: dense_gemm_blocked


def prepack_dense(weight: Tensor, decode_rows: bool = True) -> PrepackedDense:
    """Prepack a dense [N, K] weight for ``torch.ops.mkldnn._linear_pointwise`` when oneDNN can; with
    ``decode_rows`` also keep it for the AVX-512 decode GEMV (bf16 on AVX-512 CPUs): exponent-coded when its
    high bytes (sign, top exponent bits) take at most 16 values (``TUNING.code_exponents``;
    :mod:`kernels.exponent_coding`, 0.75x the bytes), else row-major (no copy when ``weight`` is already
    contiguous, e.g. an LM head tied to the embedding, else one more copy of the weight in memory)."""
    shape = (weight.shape[0], weight.shape[1])
    gemv = decode_rows and weight.dtype == torch.bfloat16 and avx512_available()
    coded = code_exponents(weight) if gemv and TUNING.code_exponents else None
    rows = weight.contiguous() if gemv and coded is None else None
    if torch.backends.mkldnn.is_available() and weight.dtype in (torch.bfloat16, torch.float32):
        form = blocked_form(*shape) if weight.dtype == torch.bfloat16 and avx512_available() else None
        return PrepackedDense(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()), True, shape, rows, coded,
                              None if form is None else form.pairs)
    return PrepackedDense(weight, False, shape, rows, coded)


def _gemv(packed: PrepackedDense) -> Callable[[Tensor, Tensor | None], Tensor] | None:
    """The decode GEMV over ``packed``'s row-major or coded weight, as gemv(x, bias32); None without one."""
    ext = extension()
    if packed.coded is not None:
        low, codes, table = packed.coded.low, packed.coded.codes, packed.coded.table
        return lambda x, bias32: ext.coded_gemm_decode(x, low, codes, table, bias32)
    if packed.rows is not None:
        rows = packed.rows
        return lambda x, bias32: ext.dense_gemm_decode(x, rows, bias32)
    return None


def dense_linear(x: Tensor, packed: PrepackedDense, bias: Tensor | None = None) -> Tensor:
    """x [M, K] -> y [M, N] through the fastest dense path: the decode GEMV for few rows, the blocked GEMM on
    oneDNN's prepacked weight for a few dozen, else oneDNN."""
    if x.shape[0] <= TUNING.dense_decode_rows(*packed.shape) and x.dtype == torch.bfloat16:
        gemv = _gemv(packed)
        if gemv is not None:
            return gemv(x.contiguous(), bias)
    if packed.pairs is not None and x.shape[0] <= TUNING.blocked_gemm_max_rows and x.dtype == torch.bfloat16:
        return extension().dense_gemm_blocked(x, packed.weight, packed.pairs, bias)
    if packed.prepacked:
        return torch.ops.mkldnn._linear_pointwise(x, packed.weight, bias, "none", [], "")
    return F.linear(x, packed.weight, bias)


def bind_dense(packed: PrepackedDense, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """:func:`dense_linear` for one weight with its lookups done once (the AVX-512 kernels' bias already
    float32)."""
    gemv = _gemv(packed)
    if gemv is None and packed.pairs is None:
        return lambda x: dense_linear(x, packed, bias)
    bias32 = _float_bias(bias)
    gemv_rows = TUNING.dense_decode_rows(*packed.shape) if gemv is not None else 0
    blocked = extension().dense_gemm_blocked if packed.pairs is not None else None

    def forward(x: Tensor) -> Tensor:  # x [M, K] -> [M, N]
        if x.dtype == torch.bfloat16 and x.dim() == 2:
            if x.shape[0] <= gemv_rows and x.is_contiguous():
                return gemv(x, bias32)
            if blocked is not None and x.shape[0] <= TUNING.blocked_gemm_max_rows:
                return blocked(x, packed.weight, packed.pairs, bias32)
        return dense_linear(x, packed, bias)
    return forward


def native_dense(packed: PrepackedDense, bias: Tensor | None) -> object | None:
    """:func:`bind_dense`'s AVX-512 paths as a linear of the compiled decoder: the GEMV up to
    ``TUNING.dense_decode_rows`` rows where the weight was kept for it (coded or row-major), then the blocked
    GEMM up to ``TUNING.blocked_gemm_max_rows`` where oneDNN prepacked it in the blocked form."""
    ext = decoder_extension()
    if isinstance(ext, str):
        return None
    bias32, gemv_rows = _float_bias(bias), TUNING.dense_decode_rows(*packed.shape)
    if packed.coded is not None:
        coded = packed.coded
        linear = ext.Linear.coded(coded.low, coded.codes, coded.table, bias32, gemv_rows)
    else:
        linear = None if packed.rows is None else ext.Linear.dense(packed.rows, bias32, gemv_rows)
    if packed.pairs is None:
        return linear
    if linear is None:
        return ext.Linear.blocked(packed.weight, packed.pairs, bias32, TUNING.blocked_gemm_max_rows)
    return linear.with_blocked(packed.weight, packed.pairs, TUNING.blocked_gemm_max_rows)


register(Kernel(
    op="bitmask_linear", name="cpu_dense", priority=5,
    devices=frozenset({"cpu"}), dtypes=frozenset({torch.bfloat16, torch.float32}),
    pack=lambda weight: prepack_dense(weight.decompress().cpu()),
    apply=dense_linear, bind=bind_dense, native=native_dense,
))
