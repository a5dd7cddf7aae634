"""The Triton ``bitmask_linear`` kernels (decode, prefill, 2:4) against the pure-torch reference.

With a GPU the kernels run on CUDA tensors. Without one they run on CPU tensors in Triton's
interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before* ``triton`` is imported
(``triton.jit`` decides at decoration time) and while kernels run; this module sets it at import
when ``triton`` is not imported yet. The variable only changes how Triton runs kernels. If another
test module imported ``triton`` first, this file cannot switch it to the interpreter in-process, so
``test_in_fresh_process`` runs the whole file again in a new interpreter and every other test here
is skipped.

Tolerances (the result is rounded once from a float32 accumulator, as in the reference, so only
the summation order differs): float32 atol=rtol=1e-4; float16 atol=rtol=2e-3; bfloat16
atol=rtol=1.6e-2 (one bf16 ulp is at most 2**-7 relative).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, see the module docstring

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels import registry  # noqa: E402
from kernels.bitmask import BitmaskTensor, compress  # noqa: E402
from kernels.reference import bitmask_linear_reference  # noqa: E402
from kernels.triton_bitmask import (  # noqa: E402
    Blocks,
    Packed24,
    PackedBitmask,
    bitmask_linear_triton,
    bitmask_words,
    choose_path,
    pack_triton,
)

DEVICE = torch.device("cuda" if GPU else "cpu")
#: triton was imported (by an earlier test module) without the interpreter: run this file anew
FRESH_PROCESS = not GPU and not isinstance(triton.language.standard.cumsum, InterpretedFunction)
_FRESH_MARK = "SPARSE_SERVE_TRITON_TEST_CHILD"  # set in the child process, to never recurse

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
SHAPES = [(24, 40), (36, 72)]  # (N, K): neither a multiple of 32
SPARSITIES = [0.0, 0.5, 0.7, 0.95, 1.0]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _kernels_can_run(request):
    if FRESH_PROCESS and request.node.name != "test_in_fresh_process":
        pytest.skip("triton was imported without TRITON_INTERPRET=1; test_in_fresh_process runs this file")


def test_in_fresh_process():
    if not FRESH_PROCESS:
        pytest.skip("the kernels run in this process")
    if os.environ.get(_FRESH_MARK):
        pytest.fail("triton is not interpreting even in a fresh process with TRITON_INTERPRET=1")
    env = {**os.environ, "TRITON_INTERPRET": "1", _FRESH_MARK: "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------- helpers

def random_weight(n: int, k: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> BitmaskTensor:
    """Unstructured: each entry zero with probability ``sparsity``; row 1 all zero when sparse."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)  # [N, K]
    w[torch.rand(n, k, generator=gen) < sparsity] = 0
    if sparsity > 0:
        w[1] = 0
    return compress(w.to(dtype)).to(DEVICE)


def weight_24(n: int, k: int, dtype: torch.dtype, extra_sparsity: float = 0.0, seed: int = 0) -> BitmaskTensor:
    """Exactly 2 nonzeros per group of 4 columns, then some dropped with ``extra_sparsity``."""
    gen = torch.Generator().manual_seed(seed)
    groups = (k + 3) // 4
    keep = torch.rand(n, groups, 4, generator=gen).argsort(-1)[..., :2]  # [N, G, 2]
    mask = torch.zeros(n, groups, 4, dtype=torch.bool).scatter_(-1, keep, True).view(n, -1)[:, :k]
    mask &= torch.rand(n, k, generator=gen) >= extra_sparsity
    w = torch.randn(n, k, generator=gen) * mask  # [N, K]
    return compress(w.to(dtype)).to(DEVICE)


def inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype=dtype, device=DEVICE)  # [M, K]
    b = torch.randn(n, generator=gen).to(dtype=dtype, device=DEVICE) if bias else None  # [N]
    return x, b


def check(x: torch.Tensor, weight: BitmaskTensor, bias, packed, blocks: Blocks | None = None) -> None:
    y = bitmask_linear_triton(x, packed, bias, blocks=blocks)  # [M, N]
    ref = bitmask_linear_reference(x, weight, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.float(), ref.float(), **TOL[x.dtype])


# ----------------------------------------------------------------------------------- general path

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 17, 65])
def test_bitmask_paths(m, shape, sparsity, dtype, bias):
    n, k = shape
    weight = random_weight(n, k, sparsity, dtype)
    packed = pack_triton(weight, allow_24=False)
    assert choose_path(m, packed) == ("decode" if m <= 16 else "prefill")
    x, b = inputs(m, n, k, dtype, bias)
    check(x, weight, b, packed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [127, 128, 129])
def test_bitmask_prefill_tile_boundary_m(m, dtype):
    weight = random_weight(36, 72, 0.7, dtype)
    x, b = inputs(m, 36, 72, dtype, bias=True)
    check(x, weight, b, pack_triton(weight, allow_24=False))


@pytest.mark.parametrize("shape", [(16, 32), (17, 33), (36, 72), (40, 100)])
@pytest.mark.parametrize("m", [3, 33])
def test_small_tiles_many_programs(m, shape):
    """Tiles smaller than the problem: several programs in M and N and several K chunks, ragged edges."""
    n, k = shape
    blocks = Blocks(m=4, n=16, k=32) if m <= 16 else Blocks(m=16, n=16, k=32)
    for dtype in DTYPES:
        weight = random_weight(n, k, 0.5, dtype)
        x, b = inputs(m, n, k, dtype, bias=True)
        check(x, weight, b, pack_triton(weight, allow_24=False), blocks)
        weight = weight_24(n, k, dtype, extra_sparsity=0.2)
        check(x, weight, b, pack_triton(weight), blocks)


@pytest.mark.parametrize("m", [1, 17])
def test_float16(m):
    for weight in (random_weight(36, 72, 0.5, torch.float16), weight_24(36, 72, torch.float16)):
        x, b = inputs(m, 36, 72, torch.float16, bias=True)
        check(x, weight, b, pack_triton(weight))


@pytest.mark.parametrize("m", [1, 17])
def test_x_dtype_differs_from_weight_dtype(m):
    """float32 activations with a bf16 weight: the kernel computes in float32."""
    weight = random_weight(24, 40, 0.5, torch.bfloat16)
    x, b = inputs(m, 24, 40, torch.float32, bias=True)
    check(x, weight, b, pack_triton(weight, allow_24=False))


@pytest.mark.parametrize("m", [1, 17])
def test_strided_x(m):
    weight = random_weight(24, 40, 0.5, torch.float32)
    wide, _ = inputs(m, 24, 80, torch.float32, bias=False)
    x = wide[:, ::2]  # [M, 40], stride (80, 2)
    check(x, weight, None, pack_triton(weight, allow_24=False))


def test_nonzero_nan_propagates():
    """NaN weights are nonzeros (kept by the layout) and must reach the output as in the reference."""
    dense = torch.zeros(24, 40)
    dense[0, 3], dense[2, 39] = float("nan"), 1.0
    weight = compress(dense).to(DEVICE)
    x, _ = inputs(1, 24, 40, torch.float32, bias=False)
    y = bitmask_linear_triton(x, pack_triton(weight, allow_24=False), None)
    assert torch.isnan(y[0, 0]) and not torch.isnan(y[0, 1:]).any()


# -------------------------------------------------------------------------------------------- 2:4

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra_sparsity", [0.0, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 17, 65])
def test_24_paths(m, shape, extra_sparsity, dtype, bias):
    n, k = shape
    weight = weight_24(n, k, dtype, extra_sparsity)
    packed = pack_triton(weight)
    assert isinstance(packed, Packed24)
    assert choose_path(m, packed) == ("2:4-decode" if m <= 16 else "2:4-prefill")
    x, b = inputs(m, n, k, dtype, bias)
    check(x, weight, b, packed)


def test_24_detection():
    structured = weight_24(24, 40, torch.float32, extra_sparsity=0.3)
    assert isinstance(pack_triton(structured), Packed24)
    assert isinstance(pack_triton(structured, allow_24=False), PackedBitmask)
    dense = structured.decompress().cpu()
    dense[5, 4:7] = 1.0  # 3 nonzeros in one group of 4
    assert isinstance(pack_triton(compress(dense).to(DEVICE)), PackedBitmask)
    unstructured = random_weight(24, 40, 0.5, torch.float32)  # 50% sparse but not 2:4
    packed = pack_triton(unstructured)
    assert isinstance(packed, PackedBitmask) and choose_path(1, packed) == "decode"


def test_24_layout_round_trip():
    """Expanding values + meta in torch gives the dense weight back."""
    weight = weight_24(8, 40, torch.float32, extra_sparsity=0.3)
    packed = pack_triton(weight)
    n, kw = packed.meta.shape
    shifts = 4 * torch.arange(8, device=DEVICE)
    nib = ((packed.meta.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & 0xF  # [N, KW, 8]
    idx = torch.stack([nib & 3, nib >> 2], -1).view(n, kw * 8, 2)  # [N, G, 2]
    assert (idx[..., 0] < idx[..., 1]).all()
    dense = torch.zeros(n, kw * 8, 4, device=DEVICE)
    dense.scatter_(-1, idx, packed.values.view(n, kw * 8, 2))
    assert torch.equal(dense.view(n, -1)[:, :40], weight.decompress())


def test_bitmask_layout():
    weight = random_weight(5, 72, 0.5, torch.float32)
    packed = pack_triton(weight, allow_24=False)
    as_bytes = torch.nn.functional.pad(weight.bitmask, (0, 12 - 9)).cpu()  # [5, 12]
    if sys.byteorder == "little":
        assert torch.equal(bitmask_words(weight.bitmask, 72).cpu(), as_bytes.view(torch.int32))
    mask = torch.nn.functional.pad(weight.mask(), (0, 96 - 72)).view(5, 3, 32)  # [N, KW, 32]
    counts = mask.sum(-1).flatten()
    assert torch.equal(packed.offsets.flatten().long(), torch.cumsum(counts, 0) - counts)
    assert packed.values.numel() == weight.nnz + 1


# --------------------------------------------------------------------------------------- launcher

def test_launcher_rejects_bad_inputs():
    weight = random_weight(24, 40, 0.5, torch.float32)
    packed = pack_triton(weight, allow_24=False)
    x, b = inputs(2, 24, 40, torch.float32, bias=True)
    with pytest.raises(ValueError, match="x must be"):
        bitmask_linear_triton(x[:, :39], packed, b)
    with pytest.raises(ValueError, match="bias must be"):
        bitmask_linear_triton(x, packed, b[:23])
    with pytest.raises(ValueError, match="dtype"):
        bitmask_linear_triton(x.double(), packed, b)
    with pytest.raises(ValueError, match="block sizes"):
        bitmask_linear_triton(x, packed, b, blocks=Blocks(m=2, n=16, k=48))
    with pytest.raises(ValueError, match="at least 16"):
        bitmask_linear_triton(torch.cat([x] * 10), packed, b, blocks=Blocks(m=8, n=16, k=32))


# --------------------------------------------------------------------------------------- registry

def test_registry_entry(monkeypatch):
    monkeypatch.delenv(registry.ENV_FORCE, raising=False)
    entry = {k.name: k for k in registry.kernels_for("bitmask_linear")}["triton"]
    assert entry.devices == frozenset({"cuda"}) and entry.priority == 20
    assert entry.dtypes == frozenset({torch.bfloat16, torch.float16, torch.float32})
    assert entry.available() == GPU
    for dtype in (torch.bfloat16, torch.float32):
        assert registry.select("bitmask_linear", "cpu", dtype).name != "triton"
    with pytest.raises(ValueError, match="triton"):
        registry.select("bitmask_linear", "cpu", torch.bfloat16, force="triton")
    if not GPU:
        assert "CUDA" in entry.why_unavailable()
        with pytest.raises(ValueError, match="not available"):
            registry.select("bitmask_linear", "cuda", torch.bfloat16, force="triton")


def test_imports_without_triton():
    """With ``triton`` unimportable the module imports, registers, and says why it cannot run."""
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from kernels import registry\n"
            "k = {k.name: k for k in registry.kernels_for('bitmask_linear')}['triton']\n"
            "assert not k.available() and 'not installed' in k.why_unavailable()\n"
            "import torch\n"
            "assert registry.select('bitmask_linear', 'cuda', torch.bfloat16).name != 'triton'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
