"""``python -m sparse_vllm CHECKPOINT``: the tensor-parallel sizes vLLM can shard a checkpoint with.

Prints each distinct layer structure (query heads, KV heads, head size, MLP width) with its layers,
then one JSON line ``{"valid_tensor_parallel_sizes": [...]}``. Needs no vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparse_vllm.structure import layer_structures, valid_tp_sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_vllm", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory (its config.json is read)")
    parser.add_argument("--max-tp", type=int, default=64, help="largest tensor-parallel size to try")
    args = parser.parse_args(argv)
    try:
        structures = layer_structures(json.loads((args.checkpoint / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        print(f"python -m sparse_vllm: error: {args.checkpoint}: {err}", file=sys.stderr)
        return 2
    for structure in dict.fromkeys(structures):
        layers = [i for i, s in enumerate(structures) if s == structure]
        print(f"heads {structure.num_heads:3d}  kv heads {structure.num_kv_heads:3d}  head dim {structure.head_dim:4d}  "
              f"mlp {structure.intermediate_size:6d}  layers {layers}")
    print(json.dumps({"valid_tensor_parallel_sizes": valid_tp_sizes(structures, args.max_tp)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
