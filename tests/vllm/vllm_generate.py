"""Greedy token ids from vLLM's offline ``LLM`` for one checkpoint; the tests run it in its own process
(vLLM's engine wants a fresh process, and one engine start per checkpoint keeps the suite short).

    python tests/vllm/vllm_generate.py MODEL_DIR --prompts '[[1, 2, 3]]' --max-tokens 16 --dtype float32 --out OUT.json

writes ``{"token_ids": [[...] per prompt]}``. The sparse_vllm plugin is loaded by vLLM through its
``vllm.general_plugins`` entry point, as in any vLLM process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compile", action="store_true", help="vLLM's default torch.compile mode (slow to start)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(args.model), dtype=args.dtype, enforce_eager=not args.compile, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(args.prompts)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    args.out.write_text(json.dumps({"token_ids": [list(o.outputs[0].token_ids) for o in outputs]}))


if __name__ == "__main__":
    main()
