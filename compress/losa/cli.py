"""``sparse-compress losa MODEL --recipe FILE -o OUT``: flags from :class:`LosaRecipe`, then the job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compress.cliutil import add_config_flags, deep_merge, parse_set
from compress.losa.recipe import LosaRecipe, parse_losa_recipe
from compress.sparsity.recipe import read_recipe_file


def configure(p: argparse.ArgumentParser) -> None:
    """The subcommand's arguments: model, output, recipe file, one flag per top-level recipe field."""
    p.add_argument("model", help="checkpoint directory or bundled model name")
    p.add_argument("-o", "--output", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--recipe", type=Path, help="YAML recipe (flags below override its fields)")
    add_config_flags(p, LosaRecipe, exclude=("eval",))
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override any recipe field, nested ones too (e.g. --set train.batch_size=8, "
                        "--set eval=null to skip the evaluation)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.partial/")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def recipe_from_args(args: argparse.Namespace) -> LosaRecipe:
    """YAML file, then flags, then --set overrides; validated."""
    raw = read_recipe_file(args.recipe) if args.recipe else {}
    flags = {k: getattr(args, k) for k in LosaRecipe.model_fields if getattr(args, k, None) is not None}
    raw = deep_merge(deep_merge(raw, flags), parse_set(args.overrides))
    return parse_losa_recipe(raw, where=str(args.recipe or "recipe"))


def run(args: argparse.Namespace) -> int:
    """Run the job and print a summary line and one JSON line."""
    from compress.models.registry import resolve_model

    from compress.losa.job import LOSS_PNG, run_losa_job

    recipe = recipe_from_args(args)
    try:
        report = run_losa_job(resolve_model(args.model), recipe, args.output, resume=args.resume,
                              progress=args.progress)
    except ImportError as err:  # peft missing: one clear line
        print(f"sparse-compress losa: error: {err}", file=sys.stderr)
        return 2
    final = report.final
    print(f"{recipe.mode}: sparsity {final['sparsity_before_merge']:.4f} before merge, "
          f"{final['sparsity_after_merge']:.4f} after; fine-tuning {report.seconds['fine_tune']:.1f} s, "
          f"total {report.seconds['total']:.1f} s -> {args.output} (loss curve: {args.output / LOSS_PNG})")
    ppl = (report.evaluation or {}).get("perplexity") or {}
    print(json.dumps({"output": str(args.output), "mode": recipe.mode, "final": final,
                      "ppl": ppl.get("ppl"), "seconds": report.seconds,
                      "losses": {r["round"]: [r.get("loss_before"), r.get("loss_after")] for r in report.rounds}}))
    return 0
