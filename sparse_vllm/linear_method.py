"""The sparse-bitmask linear method for vLLM: compressed weights in, the project's kernels at run time.

Contract:

* :class:`SparseBitmaskConfig` is the quantization config ``sparse-serve-bitmask``. It also claims a
  plain compressed-tensors checkpoint whose only compression is a ``sparse-bitmask`` sparsity block
  (what ``sparse-compress`` and llm-compressor write; stock vLLM refuses those), so such a checkpoint
  needs only its architecture changed (``--hf-overrides``) - ``export --vllm`` does both.
* :class:`SparseBitmaskLinearMethod` serves every linear of such a model. Which of a linear's
  weights are stored compressed is only known from the files, so ``create_weights`` registers empty
  placeholders named like the stored tensors (``weight``, ``compressed``, ``bitmask``,
  ``row_offsets``, ``shape``). Their loader collects each logical part (q/k/v, gate/up, or the
  whole linear) and, once the part is complete, keeps only this rank's tensor-parallel shard of it,
  cut in the compressed layout (:mod:`sparse_vllm.sharding`). ``process_weights_after_loading``
  stacks the parts (a dense part of a partly sparse fused linear is compressed) and either packs the
  bitmask weight once for the kernel the registry selects for the device and dtype (``cpu_avx512``
  for bf16 on an AVX-512 BF16 CPU, ``triton`` on CUDA; ``cpu_dense`` - decompress once at load -
  where neither runs, e.g. float32 on CPU), or, for a linear stored entirely dense, hands over to
  vLLM's own unquantized method. A missing or inconsistent tensor is an error naming the layer.
* ``apply`` runs the packed kernel through the custom op ``torch.ops.sparse_vllm.bitmask_linear``,
  so ``torch.compile`` (vLLM's default) treats it as one opaque call.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.layers.linear import (
    LinearBase, LinearMethodBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from kernels.bitmask import SUFFIXES, BitmaskTensor
from kernels.linear import OP
from kernels.registry import Kernel, select
from sparse_vllm import QUANT_METHOD
from sparse_vllm.sharding import Shard, column_shard, fuse, qkv_shard, row_shard, take

#: stored tensor names of one linear: the dense weight, or the four of the sparse-bitmask layout
BITMASK_NAMES = tuple(SUFFIXES.values())  # shape, compressed, bitmask, row_offsets
STORED_NAMES = ("weight", *BITMASK_NAMES)
#: placeholder dtypes (the loader keeps the stored tensor, whatever its dtype)
PLACEHOLDER_DTYPES = {"shape": torch.int64, "bitmask": torch.uint8, "row_offsets": torch.int64}

ShardId = str | int | None

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so its handlers print it
_LOGGED_KERNELS: set[str] = set()


# -- the custom op ------------------------------------------------------------------------------------
#: packed weights by layer key: (kernel, packed weight, out_features)
PACKED: dict[str, tuple[Kernel, Any, int]] = {}
_KEYS = itertools.count()


@torch.library.custom_op("sparse_vllm::bitmask_linear", mutates_args=())
def bitmask_linear(x: Tensor, bias: Tensor | None, key: str) -> Tensor:
    """x [M, K] -> y [M, N] = x W^T + b with the packed weight registered under ``key``."""
    kernel, packed, _ = PACKED[key]
    return kernel.apply(x, packed, bias)


@bitmask_linear.register_fake
def _bitmask_linear_fake(x: Tensor, bias: Tensor | None, key: str) -> Tensor:
    return x.new_empty((x.shape[0], PACKED[key][2]))


# -- the quantization config ------------------------------------------------------------------------
class SparseBitmaskConfig(QuantizationConfig):
    """Checkpoints with linears in the sparse-bitmask layout (``quant_method: sparse-serve-bitmask``)."""

    def __init__(self, sparsity_config: dict[str, Any] | None = None):
        super().__init__()
        self.sparsity_config = sparsity_config or {}

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # the Triton kernels need tensor cores for fp16 / bf16 tl.dot

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SparseBitmaskConfig":
        return cls(config.get("sparsity_config"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """Claim compressed-tensors checkpoints whose only compression is sparse-bitmask."""
        if user_quant not in (None, QUANT_METHOD):
            return None
        if hf_quant_cfg.get("quant_method") == QUANT_METHOD:
            return QUANT_METHOD
        sparsity = hf_quant_cfg.get("sparsity_config") or {}
        if (hf_quant_cfg.get("quant_method") == "compressed-tensors" and not hf_quant_cfg.get("config_groups")
                and sparsity.get("format") == "sparse-bitmask"):
            return QUANT_METHOD
        return None

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        return SparseBitmaskLinearMethod() if isinstance(layer, LinearBase) else None


def register_quantization() -> None:
    """Register :class:`SparseBitmaskConfig` under :data:`QUANT_METHOD` (safe to repeat)."""
    register_quantization_config(QUANT_METHOD)(SparseBitmaskConfig)


# -- the linear method ----------------------------------------------------------------------------------
class SparseBitmaskLinearMethod(LinearMethodBase):
    """One linear of a sparse-bitmask checkpoint (see the module docstring)."""

    def __init__(self) -> None:
        self.dense: UnquantizedLinearMethod | None = None

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        layer.params_dtype = params_dtype
        layer.out_features = sum(output_partition_sizes)  # N on this rank
        layer.in_features = input_size_per_partition  # K on this rank
        layer.pending = {}  # shard id -> {stored name: full tensor}, until the part is complete
        layer.parts = {}  # shard id -> this rank's piece of the part (dense [n, K] or BitmaskTensor)
        for name in STORED_NAMES:
            placeholder = torch.empty(0, dtype=PLACEHOLDER_DTYPES.get(name, params_dtype))
            placeholder.weight_loader = functools.partial(_keep_loaded, layer, name)
            layer.register_buffer(name, placeholder)  # persistent: vLLM's loader only fills those

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        parts = [_loaded_part(layer, shard) for shard in shard_ids(layer)]
        for name in STORED_NAMES:
            delattr(layer, name)
        del layer.pending, layer.parts
        weight = fuse(parts, layer.params_dtype)  # [N, K] on this rank
        _check_shape(layer, tuple(weight.shape))
        if isinstance(weight, Tensor):
            self._use_dense(layer, weight)
        else:
            self._pack(layer, weight)

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.dense is not None:
            return self.dense.apply(layer, x, bias)
        lead = x.shape[:-1]
        y = torch.ops.sparse_vllm.bitmask_linear(x.reshape(-1, layer.in_features).contiguous(), bias,
                                                 layer.sparse_key)  # [M, N]
        return y.reshape(*lead, layer.out_features)

    def _use_dense(self, layer: nn.Module, weight: Tensor) -> None:
        """Every stored part was dense: vLLM's own unquantized path (oneDNN on CPU, cuBLAS on CUDA)."""
        layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)  # [N, K]
        self.dense = UnquantizedLinearMethod()
        self.dense.process_weights_after_loading(layer)

    def _pack(self, layer: nn.Module, weight: BitmaskTensor) -> None:
        """Pack once for the kernel the registry picks for this device and dtype."""
        device = weight.values.device
        kernel = select(OP, device, layer.params_dtype)
        layer.sparse_key = f"{getattr(layer, 'prefix', 'linear')}#{next(_KEYS)}"
        PACKED[layer.sparse_key] = (kernel, kernel.pack(weight), weight.rows)
        layer.sparse_kernel = kernel.name
        layer.sparse_density = weight.density
        if kernel.name not in _LOGGED_KERNELS:
            _LOGGED_KERNELS.add(kernel.name)
            logger.info("sparse_vllm: sparse-bitmask linears run on kernel %s (%s, %s)", kernel.name, device,
                        layer.params_dtype)


def _keep_loaded(layer: nn.Module, name: str, placeholder: Tensor, loaded: Tensor, shard_id: ShardId = None) -> None:
    """A placeholder's weight loader. Once a part is complete (its dense weight, or all four bitmask
    tensors), cut this rank's shard out of it at once and keep only that, on the target device - so
    no rank ever holds more than one whole linear beyond its own shards."""
    shard = shard_id if shard_id is not None else getattr(loaded, "shard_id", None)
    pending = layer.pending.setdefault(shard, {})
    pending[name] = loaded
    part = _complete_part(pending, layer, shard)
    if part is not None:
        layer.parts[shard] = _owned(take(part, _rank_shard(layer, shard)), placeholder.device)
        del layer.pending[shard]


def shard_ids(layer: nn.Module) -> list[ShardId]:
    """The logical parts a fused linear is loaded from: q/k/v, the merged outputs, or one (None)."""
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(len(layer.output_sizes)))
    return [None]


def _where(layer: nn.Module, shard: ShardId) -> str:
    return f"{getattr(layer, 'prefix', 'a linear')}" + ("" if shard is None else f" (part {shard!r})")


def _complete_part(pending: dict[str, Tensor], layer: nn.Module, shard: ShardId) -> Tensor | BitmaskTensor | None:
    """The whole stored weight of one part once it has arrived: dense [N, K] or a validated bitmask."""
    if "weight" in pending:
        return pending["weight"]
    if any(n not in pending for n in BITMASK_NAMES):
        return None
    try:
        return BitmaskTensor.from_state_dict({f"w.{n}": pending[n] for n in BITMASK_NAMES}, "w")
    except ValueError as err:
        raise ValueError(f"{_where(layer, shard)}: {err}; the weights are damaged - re-create the checkpoint.") from None


def _loaded_part(layer: nn.Module, shard: ShardId) -> Tensor | BitmaskTensor:
    if shard in layer.parts:
        return layer.parts[shard]
    got = sorted(layer.pending.get(shard, {}))
    raise ValueError(f"{_where(layer, shard)}: the checkpoint has neither its dense weight nor all of the "
                     f"sparse-bitmask tensors {list(BITMASK_NAMES)} (found {got}); it is incomplete - "
                     "re-create it, or re-export it with `sparse-compress export --vllm`.")


def _owned(part: Tensor | BitmaskTensor, device: torch.device) -> Tensor | BitmaskTensor:
    """A copy on ``device`` that keeps no view of the whole loaded tensors alive."""
    if isinstance(part, Tensor):
        return part.to(device, copy=True)
    return BitmaskTensor(part.shape, part.values.to(device, copy=True), part.bitmask.to(device, copy=True),
                         part.row_offsets.to(device, copy=True))


def _rank_shard(layer: nn.Module, shard: ShardId) -> Shard | None:
    """The rows / columns of part ``shard`` that this tensor-parallel rank owns (None: all of it)."""
    tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    if tp_size == 1:
        return None
    if isinstance(layer, QKVParallelLinear):
        return qkv_shard(shard, layer.total_num_heads, layer.total_num_kv_heads, layer.head_size, tp_rank, tp_size)
    if isinstance(layer, MergedColumnParallelLinear):
        return column_shard(layer.output_sizes[shard], tp_rank, tp_size)
    if isinstance(layer, RowParallelLinear):
        return row_shard(layer.input_size, tp_rank, tp_size)
    if hasattr(layer, "output_size_per_partition") and layer.output_size_per_partition != layer.output_size:
        return column_shard(layer.output_size, tp_rank, tp_size)
    return None  # replicated


def _check_shape(layer: nn.Module, shape: tuple[int, ...]) -> None:
    if shape != (layer.out_features, layer.in_features):
        raise ValueError(f"{getattr(layer, 'prefix', 'a linear')}: the stored weight is {list(shape)} on this rank "
                         f"but the layer is [{layer.out_features}, {layer.in_features}]; the checkpoint's "
                         "config.json disagrees with its weights - re-export it with `sparse-compress export --vllm`.")
