"""A deterministic tiny random LLaMA with a real byte-level tokenizer.

Contract: ``build_tiny_llama(path)`` writes a complete Hugging Face checkpoint
(config, safetensors, tokenizer with a ChatML chat template) with no download;
the same seed gives the same weights on every machine. It has GQA (4 query
heads over 2 KV heads), a head size that is not 64, an MLP width that is not a
power of two and untied embeddings, so code that assumes LLaMA-7B shapes fails
on it. Unit tests use it; nothing about it is special-cased anywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-symbol byte-level BPE (no merges) plus ChatML special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size: int, **overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=vocab_size, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_llama(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **config_overrides) -> Path:
    """Write the tiny checkpoint to ``path`` and return it."""
    path = Path(path)
    tok = byte_level_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tok), **config_overrides)).to(dtype)
    with torch.no_grad():  # larger-than-default weights, so the model is far from uniform
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
