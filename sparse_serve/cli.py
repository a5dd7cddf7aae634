"""``sparse-serve``: load a checkpoint written by ``sparse-compress`` and answer.

Today this loads any sparse-serve, llm-compressor sparse-bitmask or plain
Hugging Face checkpoint - sparse linears stay compressed and run on the sparse
kernels (``--dense`` decompresses them) - and answers one chat message
greedily (``--prompt``); the OpenAI-compatible HTTP server builds on the same
loader.
"""

from __future__ import annotations

import argparse
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-serve", description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint directory or bundled model name")
    p.add_argument("--prompt", required=True, help="one user message to answer")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="compute dtype (default: bfloat16)")
    p.add_argument("--dense", action="store_true", help="decompress sparse weights (no sparse kernels)")
    p.add_argument("--kernel", default=None,
                   help="force a sparse kernel (e.g. cpu_avx512, cpu_dense, reference; default: the fastest here)")
    return p


def chat_once(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy answer to one user message, using the tokenizer's chat template."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from compress.assets import AssetError
    from compress.checkpoint import CheckpointError
    from compress.models.registry import resolve_model
    from sparse_serve.loader import load_for_serving

    try:
        loaded = load_for_serving(resolve_model(args.model), dtype=getattr(torch, args.dtype), dense=args.dense,
                                  kernel=args.kernel)
    except (ValueError, OSError, AssetError, CheckpointError) as err:
        print(f"sparse-serve: error: {err}", file=sys.stderr)
        return 2
    print(chat_once(loaded.model, loaded.tokenizer, args.prompt, args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
