"""The LLaMA family (LLaMA 1-3, SmolLM2, Mistral without sliding window, Qwen2) over a paged KV cache.

Runs the loaded model's own linears (dense, prepacked or sparse) and rotary embedding; the glue
between them - RMSNorm with the residual add, rotary, SiLU-gate and decode attention - goes through
:mod:`kernels.fused`, whose ops round exactly as the transformers modules do, so the numerics are the
reference forward's. Attention reads the paged cache (:func:`sparse_serve.attention.paged_attention`).
Modules the fused ops do not know (another norm or activation) are called as they are. Heads per
layer are read from the weight shapes, so structurally pruned layers (fewer heads, narrower MLP,
o_proj/down_proj biases) just work.

Decode steps of up to a few rows skip Python between the embedding and the LM head where every part of
every layer has a compiled form (:func:`compiled_decoder`: bf16 on an AVX-512 CPU, fused q/k/v and
gate/up, RMSNorm, SiLU): ``kernels/cpu/decoder.cpp`` calls the same kernels in the same order, so the
logits are bit for bit those of the Python loop. ``SPARSE_SERVE_DECODER=python`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from kernels.fused import LayerOps, layer_ops
from sparse_serve.attention import AttentionMetadata, paged_attention
from sparse_serve.models import register_paged

RMS_NORMS = (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm)  # weight * normalize(x), what ops.rms_norm computes
KVCache = list[tuple[Tensor, Tensor]]  # per layer (k, v): [num_blocks, block_size, kv_heads, head_dim]
ENV_DECODER = "SPARSE_SERVE_DECODER"
DECODERS = ("compiled", "python")


@register_paged
class PagedLlama:
    """One step of a LLaMA-style decoder over flattened tokens."""

    model_types = ("llama", "mistral", "qwen2")
    #: linears that read the same input, fused at load time (sparse_serve.fusion) under these names
    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}

    def __init__(self, model: nn.Module):
        decoder = model.model
        self.embed, self.norm = decoder.embed_tokens, decoder.norm
        self.rotary = _Rotary(decoder.rotary_emb, self.embed.weight.dtype)
        self.lm_head = bound(model.lm_head)
        self.head_argmax = getattr(model.lm_head, "argmax", None)  # x -> token ids [S] or None (a screened head)
        layers = list(decoder.layers)
        self.ops = layer_ops(self.embed.weight.device, self.embed.weight.dtype)
        # per layer: the norm before attention, the one before the MLP; then the final norm
        self.norms = [_norm_fn(m, self.ops) for layer in layers
                      for m in (layer.input_layernorm, layer.post_attention_layernorm)] + [_norm_fn(self.norm, self.ops)]
        # modules resolved once: a decode step of a small model makes ~10 calls per layer, and attribute
        # lookups plus nn.Module.__call__ on each cost about as much as the fused ops themselves
        self.attention = [_Attention(layer.self_attn, self.ops) for layer in layers]
        self.mlps = [_mlp_fn(layer.mlp, self.ops) for layer in layers]
        self.compiled = compiled_decoder(layers, self.attention, self.norm, self.ops)
        self._flat_caches: tuple[KVCache | None, list[Tensor]] = (None, [])

    def kv_shapes(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of every layer."""
        return [(attn.kv_heads, attn.head_dim) for attn in self.attention]

    def forward(self, ids: Tensor, positions: Tensor, meta: AttentionMetadata, caches: KVCache,
                logits_rows: Tensor, argmax: bool = False) -> Tensor:
        """logits [S, V] float32 of ``logits_rows``; with ``argmax``, where the LM head can pick each row's
        largest logit without computing them all (a screened head), those token ids [S] long instead."""
        h = self.embed(ids)  # [T, D]: the residual stream, updated in place
        cos, sin = self.rotary(h, positions)  # [T, head_dim]
        if self.compiled is not None and not meta.prefills and ids.shape[0] <= self.compiled.max_rows:
            x = self.compiled.run(h, cos, sin, meta.slots, meta.decode_tables, meta.decode_lens, self._flat(caches))
        else:
            x = self._layers(h, cos, sin, meta, caches)
        if logits_rows.numel() != x.shape[0]:  # decode-only steps need every row
            x = x[logits_rows]
        if argmax and self.head_argmax is not None:
            token_ids = self.head_argmax(x)  # [S] or None
            if token_ids is not None:
                return token_ids
        return self.lm_head(x).float()  # [S, V]

    def _layers(self, h: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata, caches: KVCache) -> Tensor:
        """Every decoder layer, op by op; h [T, D] is updated in place -> the final norm of h [T, D]."""
        norms = self.norms
        x = norms[0](h, None)
        for i, (attention, mlp, (k_cache, v_cache)) in enumerate(zip(self.attention, self.mlps, caches)):
            x = norms[2 * i + 1](h, attention(x, cos, sin, k_cache, v_cache, meta))
            x = norms[2 * i + 2](h, mlp(x))  # the next layer's input (or the final norm)
        return x

    def _flat(self, caches: KVCache) -> list[Tensor]:
        """[k0, v0, k1, v1, ...] of the runner's caches (the same list every step: flattened once)."""
        if self._flat_caches[0] is not caches:
            self._flat_caches = (caches, [t for kv in caches for t in kv])
        return self._flat_caches[1]


class _Rotary:
    """cos, sin [T, d] of the model's rotary embedding at ``positions``, looked up in a table the module
    computes once for positions [0, n) - bit for bit what it computes per step (checked for every position
    of SmolLM2 and the tiny model), without its ~50 us a call - for rope types whose frequencies do not
    depend on the sequence length; the module itself for other types and beyond the table."""

    STATIC = frozenset({"default", "linear", "llama3"})
    MAX_POSITIONS = 1 << 15  # at most 8 MB a table (bf16, head_dim 128); later positions call the module

    def __init__(self, rotary: nn.Module, dtype: torch.dtype):
        self.rotary, self.table = rotary, None
        if getattr(rotary, "rope_type", None) in self.STATIC:
            n = min(int(getattr(rotary, "max_seq_len_cached", 4096)), self.MAX_POSITIONS)
            device = rotary.inv_freq.device
            cos, sin = rotary(torch.zeros(1, 1, 1, dtype=dtype, device=device), torch.arange(n, device=device)[None])
            self.table = (cos[0], sin[0])  # [n, d] each

    def __call__(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        if self.table is not None:
            try:
                return self.table[0].index_select(0, positions), self.table[1].index_select(0, positions)
            except IndexError:  # a position beyond the table
                pass
        cos, sin = self.rotary(h.unsqueeze(0), positions.unsqueeze(0))  # [1, T, d]
        return cos[0], sin[0]


class _Attention:
    """Self-attention of one layer over the paged cache, its projections' forwards bound once."""

    def __init__(self, attn: nn.Module, ops: LayerOps):
        self.head_dim, self.scaling, self.ops = attn.head_dim, attn.scaling, ops
        self.q_heads = _out_features(attn.q_proj) // self.head_dim
        self.kv_heads = _out_features(attn.k_proj) // self.head_dim
        self.heads = [self.q_heads, self.kv_heads, self.kv_heads]  # of the fused qkv output
        qkv = getattr(attn, "qkv_proj", None)
        self.qkv = bound(qkv) if qkv is not None else None  # one fused linear: [T, (Hq + 2 Hkv) d]
        self.q, self.k, self.v = bound(attn.q_proj), bound(attn.k_proj), bound(attn.v_proj)
        self.o = bound(attn.o_proj)

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                 meta: AttentionMetadata) -> Tensor:
        t, d = x.shape[0], self.head_dim
        if self.qkv is not None:
            # split_with_sizes: Tensor.split's Python wrapper costs a few microseconds a layer
            q, k, v = self.qkv(x).view(t, -1, d).split_with_sizes(self.heads, 1)
        else:
            q, k, v = self.q(x).view(t, -1, d), self.k(x).view(t, -1, d), self.v(x).view(t, -1, d)
        # q [T, Hq, d]; k, v [T, Hkv, d]
        self.ops.rotary_cache_(q, k, v, cos, sin, k_cache, v_cache, meta.slots)  # keys and values now cached
        out = paged_attention(q, k_cache, v_cache, meta, self.scaling, self.ops)  # [T, Hq, d]
        return self.o(out.reshape(t, -1))


Norm = Callable[[Tensor, "Tensor | None"], Tensor]  # (h, delta): h += delta in place (if given), then norm(h)


def _norm_fn(norm: nn.Module, ops: LayerOps) -> Norm:
    """The residual add and ``norm`` as one call: fused for LLaMA's RMSNorm, the module itself otherwise."""
    if type(norm) in RMS_NORMS:
        weight, eps = norm.weight.detach(), norm.variance_epsilon

        def fused(h: Tensor, delta: Tensor | None) -> Tensor:
            return ops.rms_norm(h, weight, eps) if delta is None else ops.add_rms_norm_(h, delta, weight, eps)
        return fused

    def plain(h: Tensor, delta: Tensor | None) -> Tensor:
        if delta is not None:
            h.add_(delta)
        return norm(h)
    return plain


def _mlp_fn(mlp: nn.Module, ops: LayerOps) -> Callable[[Tensor], Tensor]:
    """down(act(gate(x)) * up(x)), through the fused gate/up linear (and SiLU-gate op) when there is one."""
    gate_up = getattr(mlp, "gate_up_proj", None)
    if gate_up is None:
        return mlp
    gate_up, down, act = bound(gate_up), bound(mlp.down_proj), mlp.act_fn
    if isinstance(act, (nn.SiLU, SiLUActivation)):
        silu_mul = ops.silu_mul
        return lambda x: down(silu_mul(gate_up(x)))

    def general(x: Tensor) -> Tensor:
        gate, up = gate_up(x).chunk(2, dim=-1)  # [T, I] each
        return down(act(gate) * up)
    return general


def compiled_decoder(layers: list[nn.Module], attention: list[_Attention], final_norm: nn.Module,
                     ops: LayerOps) -> Any | None:
    """Every layer as one compiled call for decode steps (``kernels/cpu/decoder.cpp``), or None where some
    part has no compiled form or ``$SPARSE_SERVE_DECODER`` is ``python``. Its linears take the decode
    kernels' loops as this process has chosen them."""
    choice = os.environ.get(ENV_DECODER, "").strip() or DECODERS[0]
    if choice not in DECODERS:
        raise ValueError(f"${ENV_DECODER}={choice!r}: choose one of {', '.join(DECODERS)}")
    if choice == "python" or ops.name != "cpu_fused":
        return None
    from kernels.cpu import decoder_extension

    ext = decoder_extension()
    norms = [(layer.input_layernorm, layer.post_attention_layernorm) for layer in layers]
    if isinstance(ext, str) or not all(type(n) in RMS_NORMS for pair in norms for n in pair) \
            or type(final_norm) not in RMS_NORMS:
        return None
    compiled = []
    for layer, attn, (pre, post) in zip(layers, attention, norms):
        mlp = layer.mlp
        parts = [getattr(layer.self_attn, "qkv_proj", None), layer.self_attn.o_proj, getattr(mlp, "gate_up_proj", None),
                 mlp.down_proj]
        linears = [part.native() if hasattr(part, "native") else None for part in parts]
        if any(lin is None for lin in linears) or not isinstance(getattr(mlp, "act_fn", None), (nn.SiLU, SiLUActivation)):
            return None
        compiled.append(ext.Layer(pre.weight.detach(), pre.variance_epsilon, post.weight.detach(), post.variance_epsilon,
                                  *linears, attn.q_heads, attn.kv_heads, attn.head_dim, attn.scaling))
    return ext.Decoder(compiled, final_norm.weight.detach(), final_norm.variance_epsilon)


def bound(linear: nn.Module) -> Callable[[Tensor], Tensor]:
    """The linear's forward for the step's flat [T, K] rows: the kernels' bound form where it has one
    (a few microseconds of lookups less per call, ~120 calls a decode step), else ``forward``."""
    bind = getattr(linear, "bound", None)
    return bind() if callable(bind) else linear.forward


def _out_features(linear: nn.Module) -> int:
    return linear.out_features if hasattr(linear, "out_features") else linear.weight.shape[0]


