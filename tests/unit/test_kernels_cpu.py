"""Every CPU implementation of bitmask_linear equals the pure-torch reference on odd shapes."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu as cpu
from kernels.bitmask import bitmask_words, compress, unpack_bitmask
from kernels.linear import SparseLinear, sparsify_linears
from kernels.reference import bitmask_linear_reference
from kernels.registry import ENV_FORCE, kernels_for, select

CPU_KERNELS = [k.name for k in kernels_for("bitmask_linear") if k.supports("cpu", torch.bfloat16)]


def sparse_weight(n: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).bfloat16()
    w[torch.rand(n, k, generator=gen) < sparsity] = 0
    if sparsity == 1.0:
        w.zero_()
    return w


def kernel_or_skip(name: str):
    kernel = {k.name: k for k in kernels_for("bitmask_linear")}[name]
    if not kernel.available():
        pytest.skip(f"{name} unavailable here: {kernel.why_unavailable()}")
    return kernel


def assert_close_bf16(y: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 outputs: float32 sums in another order round to at most a couple of bf16 ulps apart."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert not torch.isnan(y).any()
    scale = ref.float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(scale))


@pytest.fixture()
def tuning():
    names = ("decode_max_rows", "tile_rows", "panels_max_rows", "pairs_max_rows", "decode_plan", "blocked_max_bytes")
    saved = {name: getattr(cpu.TUNING, name) for name in names}
    yield cpu.TUNING
    for name, value in saved.items():
        setattr(cpu.TUNING, name, value)


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("m", [1, 17, 127, 128, 129])
@pytest.mark.parametrize("n, k", [(37, 72), (24, 129), (130, 40), (64, 256)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_reference(name, m, n, k, sparsity, with_bias):
    kernel = kernel_or_skip(name)
    w = sparse_weight(n, k, sparsity, seed=m + n + k)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    bitmask = compress(w)
    assert_close_bf16(kernel.apply(x, kernel.pack(bitmask), bias), bitmask_linear_reference(x, bitmask, bias))


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("m", [1, 5, 17, 40, 129])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bound_forward_is_apply(name, m, with_bias):
    """``Kernel.bound`` (the engine's per-layer forward, lookups done once) computes exactly what ``apply``
    does on every path: decode, pair gather, decompress + GEMM; the dense GEMV with its float32 bias."""
    kernel = kernel_or_skip(name)
    w = sparse_weight(48, 72, 0.7, seed=m)
    x = torch.randn(m, 72).bfloat16()
    bias = torch.randn(48).bfloat16() if with_bias else None
    packed = kernel.pack(compress(w))
    assert torch.equal(kernel.bound(packed, bias)(x), kernel.apply(x, packed, bias))


def test_linear_modules_bind_their_forward():
    from kernels.linear import PrepackedLinear

    linear = torch.nn.Linear(72, 48).bfloat16()
    dense = PrepackedLinear(linear)
    sparse = SparseLinear.from_bitmask(compress(sparse_weight(48, 72, 0.7)), linear.bias)
    for module in (dense, sparse):
        for m in (1, 3, 20):
            x = torch.randn(m, 72).bfloat16()
            assert torch.equal(module.bound()(x), module(x))


@pytest.mark.parametrize("with_bias", [False, True])
def test_compiled_decoder_linears_are_the_bound_forward(with_bias):
    """``native()``: the linear the compiled decoder calls (kernels/cpu/decoder.cpp) computes what the bound
    forward does, for every row count it declares (the sparse decode loops, the dense GEMV, then the blocked
    GEMM; the sparse decode kernel's larger batches go to the panels or the pair gather)."""
    from kernels.linear import PrepackedLinear

    kernel_or_skip("cpu_avx512")
    linear = torch.nn.Linear(72, 48, bias=with_bias).bfloat16()
    dense = PrepackedLinear(linear)
    sparse, sparser = (SparseLinear.from_bitmask(compress(sparse_weight(48, 72, s)), linear.bias) for s in (0.7, 0.9))
    assert sparser.packed.pair_density <= cpu.TUNING.pairs_max_density < sparse.packed.pair_density
    dense_rows = cpu.TUNING.blocked_gemm_max_rows if dense.packed.pairs else cpu.TUNING.dense_decode_rows(48, 72)
    modules = [(dense, dense_rows), (sparse, cpu.TUNING.panels_max_rows), (sparser, cpu.TUNING.pairs_max_rows)]
    no_gemv = PrepackedLinear(linear, decode_rows=False)  # every row on the blocked GEMM
    if no_gemv.packed.pairs:
        modules.append((no_gemv, cpu.TUNING.blocked_gemm_max_rows))
    for module, rows in modules:
        native = module.native()
        assert native.max_rows == rows
        for m in range(1, rows + 1):
            x = torch.randn(m, 72).bfloat16()
            assert torch.equal(native(x), module.bound()(x))
    assert SparseLinear.from_bitmask(compress(sparse_weight(48, 72, 0.7)), force="reference").native() is None
    wide = SparseLinear.from_bitmask(compress(sparse_weight(8, cpu.TUNING.wide_cols + 32, 0.7)))
    assert wide.native().max_rows == cpu.TUNING.panels_max_rows  # past wide_decode_max_rows, the panels


@pytest.mark.parametrize("decode_max_rows, tile_rows", [(0, 16), (0, 50), (200, 512)])
@pytest.mark.parametrize("m", [1, 9, 16, 33])
def test_avx512_decode_and_tiled_paths(tuning, decode_max_rows, tile_rows, m):
    """The decode and the decompress + GEMM paths of the AVX-512 kernel, whichever the tuning picks, with
    partial last tiles (the pair gather turned off)."""
    kernel = kernel_or_skip("cpu_avx512")
    tuning.decode_max_rows, tuning.tile_rows = decode_max_rows, tile_rows
    tuning.panels_max_rows = tuning.pairs_max_rows = 0
    w = sparse_weight(101, 200, 0.7, seed=m)
    x = torch.randn(m, 200).bfloat16()
    bias = torch.randn(101).bfloat16()
    bitmask = compress(w)
    assert_close_bf16(kernel.apply(x, kernel.pack(bitmask), bias), bitmask_linear_reference(x, bitmask, bias))


def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's GEMM on its own prepacked copy of the dense weight ``w``: the dense prefill path."""
    return torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), bias, "none", [], "")


def test_avx512_prefill_runs_onednns_gemm_on_the_blocked_form(tuning):
    """Past the panels the weight is decompressed into oneDNN's own prepacked form, in one scratch buffer shared
    by every shape, and multiplied by oneDNN: bit for bit its GEMM on the dense weight, for rows and columns that
    need padding, after a larger weight left other values in the buffer and after the buffer grew."""
    kernel = kernel_or_skip("cpu_avx512")
    tuning.panels_max_rows = tuning.pairs_max_rows = 0
    for n, k in [(101, 200), (256, 256), (37, 72), (640, 320), (130, 40)]:  # padding, a full form, growth
        if cpu.blocked_form(n, k) is None:
            pytest.skip(f"oneDNN prepacks a {n}x{k} weight in another form on this CPU")
        w = sparse_weight(n, k, 0.0 if n == 256 else 0.7, seed=n)
        bias = torch.randn(n).bfloat16() if n % 2 else None
        x = torch.randn(129, k).bfloat16()
        assert torch.equal(kernel.apply(x, kernel.pack(compress(w)), bias), onednn_linear(x, w, bias))


def test_avx512_prefill_without_the_blocked_form_decompresses_row_major(tuning, monkeypatch):
    """Where oneDNN's form is another (or the weight exceeds ``blocked_max_bytes``), prefill decompresses into a
    row-major scratch buffer and still equals the reference."""
    kernel = kernel_or_skip("cpu_avx512")
    tuning.panels_max_rows = tuning.pairs_max_rows = 0
    w = sparse_weight(101, 200, 0.7)
    x = torch.randn(129, 200).bfloat16()
    bitmask = compress(w)
    packed = kernel.pack(bitmask)
    monkeypatch.setattr(cpu.TUNING, "blocked_max_bytes", 0)
    assert cpu.blocked_weight(packed) is None
    assert_close_bf16(kernel.apply(x, packed, None), bitmask_linear_reference(x, bitmask, None))
    monkeypatch.setattr(cpu.TUNING, "blocked_max_bytes", 2**30)
    monkeypatch.setattr(cpu, "blocked_form", lambda n, k: None)
    assert cpu.blocked_weight(packed) is None
    assert_close_bf16(kernel.apply(x, packed, None), bitmask_linear_reference(x, bitmask, None))


def test_blocked_form_matches_onednns_bytes():
    """The form found for a shape is the one oneDNN lays out: the decompressed bytes of a weight equal the bytes
    of oneDNN's own prepacked copy of it."""
    kernel_or_skip("cpu_avx512")
    n, k = 70, 90
    form = cpu.blocked_form(n, k)
    if form is None:
        pytest.skip("oneDNN prepacks this weight in another form on this CPU")
    w = sparse_weight(n, k, 0.5)
    packed = cpu.pack_avx512(compress(w))
    buffer = torch.full((form.nbytes,), 0x7F, dtype=torch.uint8)  # anything: every byte is written
    cpu.extension().bitmask_decompress_blocked(packed.masks, packed.values, packed.row_offsets, buffer, form.pairs)
    expected = cpu.extension().mkldnn_bytes(torch.ops.mkldnn._reorder_linear_weight(w), form.nbytes)
    assert torch.equal(buffer, expected)
    with pytest.raises(RuntimeError, match="column pairs"):
        cpu.extension().bitmask_decompress_blocked(packed.masks, packed.values, packed.row_offsets, buffer, 16)


@pytest.mark.parametrize("loop", sorted(cpu.LOOPS))
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 10, 13])  # 9-10: one pass; 13: passes of 8 and 5
@pytest.mark.parametrize("k", [72, 1000, 9000])  # activations within both L1 budgets, within one, within none
def test_avx512_decode_loops(tuning, loop, m, k):
    """Each decode loop, forced for every pass, equals the reference (over its activation budget it falls
    back to rows in flight)."""
    kernel = kernel_or_skip("cpu_avx512")
    tuning.decode_plan = cpu.DecodePlan.uniform(loop)
    w = sparse_weight(21, k, 0.7, seed=k + m)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(21).bfloat16()
    bitmask = compress(w)
    assert_close_bf16(kernel.apply(x, kernel.pack(bitmask), bias), bitmask_linear_reference(x, bitmask, bias))


@pytest.mark.parametrize("m", [11, 13, 16])  # passes of 8 and 3, 8 and 5, 8 and 8
def test_avx512_decode_passes_span_by_span(m):
    """Batches past one pass run their passes span by span (about 256 KiB of weight rows each, so the later
    passes read it from L2): on a weight of several spans per thread the product equals the reference."""
    kernel_or_skip("cpu_avx512")
    w = sparse_weight(1200, 1024, 0.5, seed=m)  # ~1.1 KiB a row: ~230 rows a span, 600 rows a thread
    x = torch.randn(m, 1024).bfloat16()
    bias = torch.randn(1200).bfloat16()
    bitmask = compress(w)
    packed = cpu.pack_avx512(bitmask)
    for loops in ([cpu.LOOPS["rows"]] * cpu.MAX_PASS, [cpu.LOOPS["stream"]] * cpu.MAX_PASS):
        y = cpu.extension().bitmask_gemm_decode(x, packed.masks, packed.values, packed.row_offsets, bias.float(),
                                                 loops)
        assert_close_bf16(y, bitmask_linear_reference(x, bitmask, bias))


def test_random_packed_weight_is_consistent():
    """The calibration's synthetic weight: ~25% of its mask bits set, row offsets the running popcount, and
    the kernel's product equal to the product with its decompressed rows."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    packed = cpu.random_packed(48, 256, torch.Generator().manual_seed(3))
    dense = cpu.decompress_rows(packed, 0, 48)  # [48, 256]
    assert 0.2 < float((dense != 0).float().mean()) < 0.3
    counts = (dense != 0).sum(1)
    assert torch.equal(packed.row_offsets, torch.cumsum(counts, 0) - counts)
    assert packed.values.numel() == int(counts.sum()) + cpu.CHUNK
    x = torch.randn(3, 256).bfloat16()
    y = cpu.extension().bitmask_gemm_decode(x, packed.masks, packed.values, packed.row_offsets, None,
                                            [cpu.LOOPS["rows"]] * cpu.MAX_PASS)
    assert_close_bf16(y, (x.float() @ dense.float().T).bfloat16())


def test_decode_plan_is_measured_once_or_forced(tuning, monkeypatch):
    """The measured plan names a loop for every pass size, never the windowed one for plain weights; the
    environment or TUNING force one, and a misspelt loop is refused with the choices."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    monkeypatch.delenv(cpu.ENV_DECODE_LOOP, raising=False)
    cpu.forget_decode_env()
    plan = cpu.decode_plan()
    assert plan is cpu.decode_plan()  # cached for the process
    assert len(plan.windowed) == len(plan.plain) == cpu.MAX_PASS
    assert set(plan.windowed) <= set(cpu.LOOPS.values()) and cpu.LOOPS["window"] not in plan.plain
    try:
        monkeypatch.setenv(cpu.ENV_DECODE_LOOP, "stream")
        assert cpu.decode_plan() is plan  # the environment is read once per process ...
        cpu.forget_decode_env()  # ... or when told to
        assert cpu.decode_plan() == cpu.DecodePlan.uniform("stream")
        monkeypatch.setenv(cpu.ENV_DECODE_LOOP, "windowed")
        cpu.forget_decode_env()
        with pytest.raises(ValueError, match="rows.*stream.*window"):
            cpu.decode_plan()
        tuning.decode_plan = cpu.DecodePlan.uniform("window")
        assert cpu.decode_plan().plain == (cpu.LOOPS["rows"],) * cpu.MAX_PASS
    finally:
        monkeypatch.delenv(cpu.ENV_DECODE_LOOP)
        cpu.forget_decode_env()


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.95, 1.0])  # 0 and 0.5: windows of more than 32 nonzeros
# odd chunk counts, tails; weight rows per thread under, at and past the 16 that one row-sum reduction takes
@pytest.mark.parametrize("n, k", [(19, 64), (23, 96), (9, 129), (6, 31), (40, 1000), (64, 128), (97, 64)])
def test_windowed_decode_loop_for_every_pass_size(sparsity, n, k):
    """The windowed loop (compressed column indices + permute), forced on for every pass of 1-8 rows and
    for 11 rows (a pass of 8, then 3), equals the reference, whatever the weight's windows hold."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    w = sparse_weight(n, k, sparsity, seed=n + k)
    packed = cpu.pack_avx512(compress(w))
    bias = torch.randn(n).bfloat16()
    for m in (1, 2, 3, 4, 5, 8, 11):
        x = torch.randn(m, k).bfloat16()
        y = cpu.extension().bitmask_gemm_decode(x, packed.masks, packed.values, packed.row_offsets, bias,
                                                [cpu.LOOPS["window"]] * cpu.MAX_PASS)
        assert_close_bf16(y, bitmask_linear_reference(x, compress(w), bias))


def test_pack_chooses_the_windowed_loop_when_few_windows_overflow(monkeypatch):
    """At 70% a 64-column window rarely holds more than 32 nonzeros; at 30% most do."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    sparse, dense = compress(sparse_weight(64, 256, 0.7)), compress(sparse_weight(64, 256, 0.3))
    assert cpu.overfull_windows(sparse.bitmask) < 0.01 < 0.9 < cpu.overfull_windows(dense.bitmask)
    assert cpu.pack_avx512(sparse).windowed and not cpu.pack_avx512(dense).windowed
    full = torch.zeros(2, 8, dtype=torch.uint8)
    full[0] = 255  # row 0: both windows full (64 of 64); row 1 empty
    assert cpu.overfull_windows(full) == 0.5
    plan, calls = cpu.decode_plan(), []  # measured before the extension is replaced
    decode = cpu.extension().bitmask_gemm_decode
    monkeypatch.setattr(cpu, "extension", lambda: type("Ext", (), {"bitmask_gemm_decode": staticmethod(
        lambda *a: calls.append(a[-1]) or decode(*a))}))
    x = torch.randn(1, 256).bfloat16()
    cpu.apply_avx512(x, cpu.pack_avx512(sparse))
    cpu.apply_avx512(x, cpu.pack_avx512(dense))
    assert [list(c) for c in calls] == [list(plan.windowed), list(plan.plain)]


@pytest.mark.parametrize("op", ["bitmask_gemm_pairs", "bitmask_gemm_panels"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("n, k", [(19, 64), (9, 129), (6, 31), (5, 40), (130, 40), (40, 1000)])  # tails; K-blocks
def test_many_row_kernels_equal_reference(op, sparsity, n, k):
    """The pair gather and the panel GEMM for 1 to 256 activation rows (1-4 register groups of 16, a partial
    group, later passes of 64 rows; panels of 6 or 8 weight rows with a partial last one, or fewer rows than
    one), with and without bias, equal the reference whatever the weight holds."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    w = sparse_weight(n, k, sparsity, seed=3 * n + k)
    bitmask = compress(w)
    packed = cpu.pack_avx512(bitmask)
    for m, with_bias in ((1, True), (16, False), (17, True), (33, False), (48, True), (64, True), (65, True),
                         (130, False), (256, True)):
        x = torch.randn(m, k).bfloat16()
        bias = torch.randn(n).bfloat16() if with_bias else None
        y = getattr(cpu.extension(), op)(x, packed.masks, packed.values, packed.row_offsets, bias)
        assert_close_bf16(y, bitmask_linear_reference(x, bitmask, bias))


def test_pair_density_counts_column_pairs_with_a_nonzero():
    bitmask = torch.tensor([[0b0000_0001, 0b1100_0110], [0, 0b1111_1111]], dtype=torch.uint8)
    # row 0: pair 0 of byte 0; pairs 1, 2 and 3 of byte 1. row 1: all four pairs of byte 1
    assert cpu.pair_density(bitmask) == 8 / 16
    assert cpu.pair_density(compress(sparse_weight(64, 256, 0.7)).bitmask) == pytest.approx(1 - 0.7**2, abs=0.03)


def test_apply_takes_panels_or_the_pair_gather_for_a_few_dozen_rows(monkeypatch):
    """``decode_max_rows`` + 1 to ``panels_max_rows`` rows take the panel GEMM, up to ``pairs_max_rows`` the pair
    gather for a 90% sparse weight; more rows decompress (into oneDNN's blocked form where it is that); up to
    ``decode_max_rows`` decode."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    sparse, denser = (cpu.pack_avx512(compress(sparse_weight(48, 256, s))) for s in (0.9, 0.7))
    assert sparse.pair_density <= cpu.TUNING.pairs_max_density < denser.pair_density
    cpu.decode_plan()  # measured (on its own decode calls) before the calls are recorded
    decompress = "bitmask_decompress_blocked" if cpu.blocked_form(48, 256) else "bitmask_decompress_into"
    ext, calls = cpu.extension(), []
    recorded = ("bitmask_gemm_decode", "bitmask_gemm_pairs", "bitmask_gemm_panels", "bitmask_decompress_into",
                "bitmask_decompress_blocked")
    monkeypatch.setattr(cpu, "extension", lambda: type("Ext", (), {
        name: staticmethod(lambda *a, _f=getattr(ext, name), _n=name: calls.append(_n) or _f(*a))
        for name in recorded} | {"blocked_weight_view": staticmethod(ext.blocked_weight_view)}))
    panels, pairs, decode = cpu.TUNING.panels_max_rows, cpu.TUNING.pairs_max_rows, cpu.TUNING.decode_rows(256)
    assert decode < panels < pairs
    for m, packed in ((decode + 1, denser), (panels, denser), (decode + 1, sparse), (pairs, sparse),
                      (panels + 1, denser), (pairs + 1, sparse), (decode, denser)):
        cpu.apply_avx512(torch.randn(m, 256).bfloat16(), packed)
    assert calls == ["bitmask_gemm_panels", "bitmask_gemm_panels", "bitmask_gemm_pairs", "bitmask_gemm_pairs",
                     decompress, decompress, "bitmask_gemm_decode"]
    # a weight wider than wide_cols: the decode kernel up to wide_decode_max_rows, the panels from one more
    wide = cpu.pack_avx512(compress(sparse_weight(8, cpu.TUNING.wide_cols + 32, 0.7)))
    limit = cpu.TUNING.wide_decode_max_rows
    assert cpu.TUNING.decode_rows(wide.shape[1]) == limit < cpu.TUNING.decode_rows(256) == cpu.TUNING.decode_max_rows
    calls.clear()
    for m in (limit, limit + 1):
        cpu.apply_avx512(torch.randn(m, wide.shape[1]).bfloat16(), wide)
    assert calls == ["bitmask_gemm_decode", "bitmask_gemm_panels"]


@pytest.mark.parametrize("m", [1, 3, 8, 11])
@pytest.mark.parametrize("n, k", [(37, 72), (24, 129), (64, 256), (5, 31)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_gemv_equals_a_float32_linear(m, n, k, with_bias):
    """The AVX-512 dense decode GEMV (the dense baseline's batch-1 path), K tails included."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    w = sparse_weight(n, k, 0.0, seed=n + k)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float()).bfloat16()
    assert_close_bf16(cpu.extension().dense_gemm_decode(x, w, bias), ref)


def test_dense_linear_takes_the_gemv_then_the_blocked_gemm_then_onednn(monkeypatch):
    """The dense path by rows: the GEMV up to ``dense_decode_rows``, the blocked GEMM on oneDNN's prepacked
    weight up to ``blocked_gemm_max_rows``, oneDNN's own GEMM above; each within bf16 rounding of oneDNN's."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    monkeypatch.setattr(cpu.TUNING, "code_exponents", False)  # the row-major GEMV (the coded one: below)
    monkeypatch.setattr(cpu.TUNING, "blocked_gemm_max_rows", 6)
    w = sparse_weight(40, 96, 0.0)
    packed, plain = cpu.prepack_dense(w), cpu.prepack_dense(w, decode_rows=False)
    assert packed.rows is not None and plain.rows is None and packed.pairs is not None
    calls = []
    ext = cpu.extension()
    recorder = type("Ext", (), {name: staticmethod(lambda *a, f=getattr(ext, name), name=name: calls.append(
        (name, a[0].shape[0])) or f(*a)) for name in ("dense_gemm_decode", "dense_gemm_blocked")})
    monkeypatch.setattr(cpu, "extension", lambda: recorder)
    for m in (1, 2, 3, 6, 7):
        x = torch.randn(m, 96).bfloat16()
        ref = torch.ops.mkldnn._linear_pointwise(x, plain.weight, None, "none", [], "")
        assert_close_bf16(cpu.dense_linear(x, packed), ref)
        assert_close_bf16(cpu.bind_dense(packed, None)(x), ref)
    twice = lambda name, m: [(name, m)] * 2  # noqa: E731 - dense_linear, then the bound forward
    assert calls == [*twice("dense_gemm_decode", 1), *twice("dense_gemm_decode", 2),
                     *twice("dense_gemm_blocked", 3), *twice("dense_gemm_blocked", 6)]  # 7 rows: oneDNN


@pytest.mark.parametrize("m", [1, 3, 6, 7, 13, 17, 64])
@pytest.mark.parametrize("n, k", [(37, 72), (24, 129), (130, 40), (64, 256), (5, 31), (200, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_blocked_gemm_equals_a_float32_linear(m, n, k, with_bias):
    """``dense_gemm_blocked`` reads oneDNN's prepacked weight in place: rows past N and columns past K (the
    form's zero padding), row groups of up to 6 and their remainders, with and without bias."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    form = cpu.blocked_form(n, k)
    if form is None:
        pytest.skip(f"oneDNN prepacks a {n}x{k} weight in another form here")
    w = sparse_weight(n, k, 0.0, seed=n * k)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float()).bfloat16()
    prepacked = torch.ops.mkldnn._reorder_linear_weight(w)
    y = cpu.extension().dense_gemm_blocked(x, prepacked, form.pairs, bias)
    assert_close_bf16(y, ref)
    assert_close_bf16(cpu.extension().dense_gemm_blocked(x.t().contiguous().t(), prepacked, form.pairs, bias), ref)


def test_blocked_gemm_names_bad_input():
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    w = sparse_weight(64, 64, 0.0)
    ext, x = cpu.extension(), torch.randn(3, 64).bfloat16()
    with pytest.raises(RuntimeError, match="oneDNN prepacked"):
        ext.dense_gemm_blocked(x, w, 32, None)  # a plain tensor
    with pytest.raises(RuntimeError, match="too few for K"):
        ext.dense_gemm_blocked(x, torch.ops.mkldnn._reorder_linear_weight(w), 16, None)
    with pytest.raises(RuntimeError, match="x's K"):
        ext.dense_gemm_blocked(torch.randn(3, 32).bfloat16(), torch.ops.mkldnn._reorder_linear_weight(w), 32, None)


def test_dense_decode_rows_follow_the_weight_shape():
    """The GEMV's row limit: ``dense_decode_max_rows`` for a narrow weight, one row for a wide one, more for a
    tall (vocabulary-sized) one that is not wide."""
    t = cpu.CpuTuning()
    assert t.dense_decode_rows(3072, 576) == t.dense_decode_max_rows == 2
    assert t.dense_decode_rows(4096, t.wide_cols + 1) == 1
    assert t.dense_decode_rows(t.tall_rows, 576) == t.tall_dense_decode_max_rows == 6
    assert t.dense_decode_rows(t.tall_rows, t.wide_cols + 1) == 1
    assert t.dense_decode_rows(t.tall_rows - 1, t.wide_cols) == 2


def test_bitmask_words_follow_the_bitmask():
    w = sparse_weight(5, 70, 0.6)
    bitmask = compress(w)
    words = bitmask_words(bitmask.bitmask, 70)  # int32 [5, 3]
    assert words.shape == (5, 3)
    bits = (words.view(torch.uint8).view(5, 12).unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    assert torch.equal(bits.reshape(5, 96)[:, :70].bool(), unpack_bitmask(bitmask.bitmask, 70))
    assert not bits.reshape(5, 96)[:, 70:].any()  # padding columns are zero


def test_selection_prefers_the_fast_path_and_can_be_forced(monkeypatch):
    chosen = select("bitmask_linear", "cpu", torch.bfloat16)
    expected = "cpu_avx512" if cpu.avx512_available() else "cpu_dense"
    assert chosen.name == expected
    assert select("bitmask_linear", "cpu", torch.float32).name == "cpu_dense"  # avx512 kernel is bf16 only
    monkeypatch.setenv(ENV_FORCE, "reference")
    assert select("bitmask_linear", "cpu", torch.bfloat16).name == "reference"
    monkeypatch.setenv(ENV_FORCE, "no-such-kernel")
    with pytest.raises(ValueError, match="no-such-kernel"):
        select("bitmask_linear", "cpu", torch.bfloat16)


def test_without_avx512_the_dense_fallback_serves(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    cpu.extension.cache_clear()
    try:
        assert "lacks" in cpu.avx512_unavailable_reason()
        assert select("bitmask_linear", "cpu", torch.bfloat16).name == "cpu_dense"
        with pytest.raises(ValueError, match="not available"):
            select("bitmask_linear", "cpu", torch.bfloat16, force="cpu_avx512")
        layer = SparseLinear.from_bitmask(compress(sparse_weight(24, 40, 0.5)))
        x = torch.randn(3, 40).bfloat16()
        assert layer.kernel.name == "cpu_dense"
        assert_close_bf16(layer(x), bitmask_linear_reference(x, compress(sparse_weight(24, 40, 0.5))))
    finally:
        monkeypatch.undo()
        cpu.extension.cache_clear()


def test_sparsify_linears_swaps_modules_and_keeps_outputs(tiny_model):
    from compress.adapter import get_adapter

    model = tiny_model.to(torch.bfloat16)
    adapter = get_adapter(model)
    names = adapter.linear_weight_names()[:7]  # layer 0
    sparse = {}
    for name in names:
        weight = model.get_parameter(name)
        weight.data[torch.rand_like(weight, dtype=torch.float32) < 0.6] = 0
        sparse[name] = compress(weight.data)
    ids = torch.randint(3, 200, (2, 11))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        replaced = sparsify_linears(model, sparse)
        after = model(input_ids=ids).logits
    assert len(replaced) == 7
    assert isinstance(model.get_submodule(replaced[0]), SparseLinear)
    torch.testing.assert_close(after.float(), before.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("op", ["bitmask_gemm_pairs", "bitmask_gemm_panels"])
def test_many_row_kernels_round_like_torch(op):
    """With one nonzero per weight row every sum is exact, so the bf16 outputs (bias added, then one rounding
    to nearest even) must equal torch's bit for bit, ties and tiny values included."""
    if not cpu.avx512_available():
        pytest.skip(cpu.avx512_unavailable_reason())
    gen = torch.Generator().manual_seed(5)
    n, k, m = 37, 100, 45
    w = torch.zeros(n, k)
    w[torch.arange(n), torch.randint(0, k, (n,), generator=gen)] = torch.randn(n, generator=gen) * 1e-3
    w = w.bfloat16()
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-30, 30, k)).bfloat16()
    bias = (torch.randn(n, generator=gen) * 1e-2).bfloat16()
    packed = cpu.pack_avx512(compress(w))
    y = getattr(cpu.extension(), op)(x, packed.masks, packed.values, packed.row_offsets, bias)
    assert torch.equal(y, torch.addmm(bias.float(), x.float(), w.float().T).bfloat16())
