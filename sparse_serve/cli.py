"""``sparse-serve MODEL``: serve a checkpoint written by ``sparse-compress`` over an OpenAI-compatible API.

Loads any sparse-serve, llm-compressor sparse-bitmask or plain Hugging Face checkpoint (sparse linears
stay compressed and run on the sparse kernels; ``--dense`` decompresses them) into the
continuous-batching engine and serves it on 127.0.0.1:8000. ``--prompt TEXT`` instead answers one chat
message greedily through the same engine and exits. Every flag comes from the typed configs in
:mod:`sparse_serve.config`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from compress.cliutil import add_config_flags, config_from_args
from sparse_serve.config import API_KEY_ENV, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig

SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "server": ServerConfig}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-serve", description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint directory or bundled model name (e.g. smollm2-135m-instruct)")
    p.add_argument("--prompt", default=None, help="answer this one chat message greedily and exit (no server)")
    p.add_argument("--max-tokens", type=int, default=64, help="with --prompt: most tokens to generate (default: 64)")
    for title, config in SECTIONS.items():
        add_config_flags(p.add_argument_group(title), config, exclude=("model",))
    return p


def configs(args: argparse.Namespace) -> tuple[ModelConfig, EngineConfig, ServerConfig]:
    """The validated configs from the parsed flags (library code never sees ``args``)."""
    model = ModelConfig(model=args.model, **config_from_args(ModelConfig, args).model_dump(exclude={"model"}))
    engine = EngineConfig(cache=config_from_args(CacheConfig, args),
                          scheduler=config_from_args(SchedulerConfig, args))
    server = config_from_args(ServerConfig, args)
    if server.api_key is None and os.environ.get(API_KEY_ENV):
        server = server.model_copy(update={"api_key": os.environ[API_KEY_ENV]})
    return model, engine, server


def set_threads(threads: int | None) -> None:
    """torch's thread count: ``threads``, or as many as CPUs this process may run on (taskset, cgroups)."""
    import torch

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def answer_once(model_cfg: ModelConfig, engine_cfg: EngineConfig, prompt: str, max_tokens: int) -> str:
    """Greedy answer to one user message through the engine (the tokenizer's chat template applied)."""
    import torch

    from compress.models.registry import resolve_model
    from sparse_serve.engine import LLMEngine
    from sparse_serve.loader import load_for_serving
    from sparse_serve.sampling_params import SamplingParams
    from sparse_serve.server import eos_token_ids

    dtype = getattr(torch, model_cfg.dtype)
    loaded = load_for_serving(resolve_model(model_cfg.model), dtype=dtype, dense=model_cfg.dense,
                              kernel=model_cfg.kernel,
                              dense_gemv=model_cfg.dense_gemv, huge_pages=model_cfg.huge_pages,
                              argmax_screen=model_cfg.argmax_screen)
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    engine = LLMEngine(loaded.model, eos_token_ids(loaded.model, tok), len(ids) + max_tokens, engine_cfg, dtype)
    engine.add_request("once", ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    out = []
    while engine.has_work():
        for result in engine.step()[0]:
            out = result.outputs[0].token_ids
    return tok.decode(out, skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from compress.assets import AssetError
    from compress.checkpoint import CheckpointError

    try:
        model_cfg, engine_cfg, server_cfg = configs(args)
        set_threads(model_cfg.threads)
        if args.prompt is not None:
            print(answer_once(model_cfg, engine_cfg, args.prompt, args.max_tokens))
            return 0
        logging.basicConfig(level=server_cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from sparse_serve.server import load_state, serve

        serve(load_state(model_cfg, engine_cfg, server_cfg))
    except (ValueError, OSError, AssetError, CheckpointError) as err:
        print(f"sparse-serve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
