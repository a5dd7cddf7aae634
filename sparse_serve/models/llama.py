"""The LLaMA family (LLaMA 1-3, SmolLM2, Mistral without sliding window, Qwen2) over a paged KV cache.

Runs the transformers modules of the loaded model directly - norms, linears (dense, prepacked or
sparse), MLP and rotary embedding - so its numerics are the reference forward's; only attention is
replaced by :func:`sparse_serve.attention.paged_attention`. Heads per layer are read from the weight
shapes, so structurally pruned layers (fewer heads, narrower MLP, o_proj/down_proj biases) just work.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sparse_serve.attention import AttentionMetadata, paged_attention, write_kv
from sparse_serve.models import register_paged

KVCache = list[tuple[Tensor, Tensor]]  # per layer (k, v): [num_blocks, block_size, kv_heads, head_dim]


@register_paged
class PagedLlama:
    """One step of a LLaMA-style decoder over flattened tokens."""

    model_types = ("llama", "mistral", "qwen2")
    #: linears that read the same input, fused at load time (sparse_serve.fusion) under these names
    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}

    def __init__(self, model: nn.Module):
        decoder = model.model
        self.embed, self.norm, self.rotary = decoder.embed_tokens, decoder.norm, decoder.rotary_emb
        self.lm_head = model.lm_head
        self.layers = list(decoder.layers)

    def kv_shapes(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of every layer."""
        return [(_out_features(layer.self_attn.k_proj) // layer.self_attn.head_dim, layer.self_attn.head_dim)
                for layer in self.layers]

    def forward(self, ids: Tensor, positions: Tensor, meta: AttentionMetadata, caches: KVCache,
                logits_rows: Tensor) -> Tensor:
        h = self.embed(ids)  # [T, D]
        cos, sin = self.rotary(h.unsqueeze(0), positions.unsqueeze(0))  # [1, T, head_dim]
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            x = layer.input_layernorm(h)
            h = h + self._attention(layer.self_attn, x, cos[0], sin[0], k_cache, v_cache, meta)
            h = h + _mlp(layer.mlp, layer.post_attention_layernorm(h))
        if logits_rows.numel() != h.shape[0]:  # decode-only steps need every row
            h = h[logits_rows]
        return self.lm_head(self.norm(h)).float()  # [S, V]

    @staticmethod
    def _attention(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                   meta: AttentionMetadata) -> Tensor:
        t, d = x.shape[0], attn.head_dim
        qkv = getattr(attn, "qkv_proj", None)
        if qkv is not None:  # one fused linear, then the heads split: [T, Hq + 2 Hkv, d]
            heads = qkv(x).view(t, -1, d)
            hq, hkv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
            q, k, v = heads.split([hq, hkv, hkv], dim=1)
        else:
            q = attn.q_proj(x).view(t, -1, d)  # [T, Hq, d]
            k = attn.k_proj(x).view(t, -1, d)  # [T, Hkv, d]
            v = attn.v_proj(x).view(t, -1, d)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        write_kv(k_cache, v_cache, k, v, meta.slots)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, attn.scaling)  # [T, Hq, d]
        return attn.o_proj(out.reshape(t, -1))


def _mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """down(act(gate(x)) * up(x)), through the fused gate/up linear when there is one."""
    gate_up = getattr(mlp, "gate_up_proj", None)
    if gate_up is None:
        return mlp(x)
    gate, up = gate_up(x).chunk(2, dim=-1)  # [T, I] each
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _out_features(linear: nn.Module) -> int:
    return linear.out_features if hasattr(linear, "out_features") else linear.weight.shape[0]


