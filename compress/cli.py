"""``sparse-compress``: the offline command line.

Subcommands are registered in ``COMMANDS`` (name -> parser setup and runner);
each runner turns its flags into a typed config and calls library code.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compress.cliutil import add_config_flags, config_from_args


@dataclass(frozen=True)
class Command:
    """One subcommand: how to declare its flags and how to run it."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- models --------------------------------------------------------------------
def _configure_models(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="build a bundled model's checkpoint into the cache (idempotent)")
    fetch.add_argument("name", help="bundled model name (see `models list`)")
    fetch.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    sub.add_parser("list", help="list bundled models and where they are cached")


def _run_models(args: argparse.Namespace) -> int:
    from compress.models.registry import MODELS, fetch_model, model_dir

    if args.action == "list":
        for name, spec in MODELS.items():
            print(f"{name}\t{spec.display_name}\t{model_dir(name)}")
        return 0
    print(fetch_model(args.name, force=args.force))
    return 0


# -- eval ----------------------------------------------------------------------
def _configure_eval(p: argparse.ArgumentParser) -> None:
    from compress.eval import EvalConfig

    p.add_argument("model", help="checkpoint directory or bundled model name")
    add_config_flags(p, EvalConfig)
    p.add_argument("--output", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--no-store", action="store_true",
                   help="do not store the results in the checkpoint's manifest")


def _run_eval(args: argparse.Namespace) -> int:
    from compress.checkpoint import load_checkpoint, store_evaluation
    from compress.eval import DTYPES, EvalConfig, run_evaluation
    from compress.models.registry import resolve_model

    config = config_from_args(EvalConfig, args)
    config.task_names()  # fail on a bad task name before loading anything
    path = resolve_model(args.model)
    loaded = load_checkpoint(path, dtype=DTYPES[config.dtype])
    report = run_evaluation(loaded.model.eval(), loaded.tokenizer, config, name=str(args.model))
    print(report.table())
    payload = report.model_dump()
    if args.output:
        args.output.write_text(json.dumps(payload, indent=2))
    if not args.no_store:
        where = store_evaluation(path, payload, model=loaded.model)
        print(f"stored in {where}")
    print(json.dumps(payload))
    return 0


# -- prune -------------------------------------------------------------------------
def _configure_prune(p: argparse.ArgumentParser) -> None:
    from compress.sparsity.recipe import PruneRecipe

    p.add_argument("model", help="checkpoint directory or bundled model name")
    p.add_argument("-o", "--output", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--recipe", type=Path, help="YAML recipe (flags below override its fields)")
    add_config_flags(p, PruneRecipe)
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override any recipe field, nested ones too (e.g. --set calibration.samples=32)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.partial/")
    p.add_argument("--offload", action="store_true",
                   help="keep the decoder layers on disk and load one at a time (models larger than RAM)")


def recipe_from_args(args: argparse.Namespace):
    """The recipe: YAML file, then flags, then --set overrides; validated."""
    from compress.cliutil import deep_merge, parse_set
    from compress.sparsity.recipe import PruneRecipe, parse_recipe, read_recipe_file

    raw = read_recipe_file(args.recipe) if args.recipe else {}
    flags = {k: getattr(args, k) for k in PruneRecipe.model_fields if getattr(args, k, None) is not None}
    raw = deep_merge(deep_merge(raw, flags), parse_set(args.overrides))
    return parse_recipe(raw, where=str(args.recipe or "recipe"))


def _run_prune(args: argparse.Namespace) -> int:
    from compress.models.registry import resolve_model
    from compress.sparsity.job import REPORT_PNG, run_prune_job

    recipe = recipe_from_args(args)
    report = run_prune_job(resolve_model(args.model), recipe, args.output, resume=args.resume,
                           offload=args.offload)
    print(f"pruned to {report.achieved_sparsity:.4f} sparsity ({recipe.method}, {recipe.allocation}, "
          f"{recipe.pattern}) in {report.seconds['total']:.1f} s -> {args.output} "
          f"(plot: {args.output / REPORT_PNG})")
    print(json.dumps({"output": str(args.output), "achieved_sparsity": report.achieved_sparsity,
                      "layer_rates": report.layer_rates, "seconds": report.seconds,
                      "allocation": {k: v for k, v in report.allocation.items() if k != "cka"}}))
    return 0


# -- flap / self-prune -------------------------------------------------------------
def _configure_structured(load_cls) -> Callable[[argparse.ArgumentParser], None]:
    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="checkpoint directory or bundled model name")
        p.add_argument("-o", "--output", type=Path, required=True, help="output checkpoint directory")
        p.add_argument("--recipe", type=Path, help="YAML recipe (flags below override its fields)")
        add_config_flags(p, load_cls())
        p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                       help="override any recipe field, nested ones too (e.g. --set calibration.samples=256)")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.partial/")
    return configure


def structured_recipe_from_args(recipe_cls, args: argparse.Namespace):
    """The structured recipe: YAML file, then flags, then --set overrides; validated."""
    from compress.cliutil import deep_merge, parse_set
    from compress.sparsity.recipe import read_recipe_file
    from compress.structured.recipe import parse_structured

    raw = read_recipe_file(args.recipe) if args.recipe else {}
    flags = {k: getattr(args, k) for k in recipe_cls.model_fields if getattr(args, k, None) is not None}
    raw = deep_merge(deep_merge(raw, flags), parse_set(args.overrides))
    return parse_structured(recipe_cls, raw, where=str(args.recipe or "recipe"))


def _flap_recipe_cls():
    from compress.structured.recipe import FlapRecipe

    return FlapRecipe


def _self_prune_recipe_cls():
    from compress.structured.recipe import SelfPruneRecipe

    return SelfPruneRecipe


def _print_structured(report, args: argparse.Namespace, what: str) -> None:
    from compress.structured.job import REPORT_PNG

    print(f"{what}: removed {report.achieved_ratio:.4f} of the decoder linears' parameters "
          f"({report.params_before:,} -> {report.params_after:,}) in {report.seconds['total']:.1f} s -> "
          f"{args.output} (plot: {args.output / REPORT_PNG})")
    summary = {"output": str(args.output), "achieved_ratio": report.achieved_ratio,
               "params_after": report.params_after, "seconds": report.seconds,
               "heads": [layer["num_heads"] for layer in report.layers],
               "mlp_widths": [layer["intermediate_size"] for layer in report.layers]}
    if report.search:
        summary["search"] = {"best_fitness": report.search["best"]["fitness"],
                             "best_rates": report.search["best"]["rates"],
                             "evaluations": report.search["evaluations"],
                             "operators": report.search["operators"], "notes": report.search["notes"][-5:]}
    print(json.dumps(summary))


def _run_flap(args: argparse.Namespace) -> int:
    from compress.models.registry import resolve_model
    from compress.structured.job import run_flap_job

    recipe = structured_recipe_from_args(_flap_recipe_cls(), args)
    report = run_flap_job(resolve_model(args.model), recipe, args.output, resume=args.resume)
    _print_structured(report, args, f"{recipe.method} ({recipe.metric}, {recipe.structure}, "
                                    f"bias compensation {recipe.bias_compensation})")
    return 0


def _run_self_prune(args: argparse.Namespace) -> int:
    from compress.models.registry import resolve_model
    from compress.structured.job import SEARCH_PNG, run_self_prune_job

    recipe = structured_recipe_from_args(_self_prune_recipe_cls(), args)
    report = run_self_prune_job(resolve_model(args.model), recipe, args.output, resume=args.resume)
    _print_structured(report, args, f"self-prune (best selection perplexity "
                                    f"{report.search['best']['fitness']:.3f}, search plot {SEARCH_PNG})")
    return 0


# -- losa (the flags and the job live in compress/losa/cli.py) ----------------------
def _configure_losa(p: argparse.ArgumentParser) -> None:
    from compress.losa.cli import configure

    configure(p)


def _run_losa(args: argparse.Namespace) -> int:
    from compress.losa.cli import run

    return run(args)


# -- export --------------------------------------------------------------------
def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="sparse-serve checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--dense", action="store_true",
                        help="write a plain dense Hugging Face checkpoint (zeros stored explicitly)")
    target.add_argument("--vllm", action="store_true",
                        help="write a copy whose config.json vLLM loads with the sparse_vllm plugin "
                             "(architecture and quantization_config; the weights are unchanged)")


def _run_export(args: argparse.Namespace) -> int:
    from compress.checkpoint import export_dense
    from compress.models.registry import resolve_model

    if args.vllm:
        from sparse_vllm.export import export_vllm

        print(export_vllm(resolve_model(args.model), args.output))
        return 0
    print(export_dense(resolve_model(args.model), args.output))
    return 0


# -- info ----------------------------------------------------------------------
def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory or bundled model name")


def _run_info(args: argparse.Namespace) -> int:
    from compress.checkpoint import describe_checkpoint
    from compress.models.registry import resolve_model

    print(json.dumps(describe_checkpoint(resolve_model(args.model)), indent=2))
    return 0


COMMANDS: dict[str, Command] = {
    "models": Command("bundled models (fetch, list)", _configure_models, _run_models),
    "prune": Command("layer-wise unstructured / N:M pruning (Wanda, SparseGPT, magnitude; "
                     "uniform, OWL, ATP, RMI allocation)", _configure_prune, _run_prune),
    "flap": Command("structured pruning: FLAP (WIFV/IFV/WIFN, al-am/ul-um, bias compensation) or Wanda-sp",
                    _configure_structured(_flap_recipe_cls), _run_flap),
    "self-prune": Command("Self-Pruner: evolutionary (LLM or classical) search of per-layer structured rates, "
                          "then FLAP with the best", _configure_structured(_self_prune_recipe_cls), _run_self_prune),
    "search": Command("alias of self-prune", _configure_structured(_self_prune_recipe_cls), _run_self_prune),
    "losa": Command("LoSA: progressive pruning with masked LoRA recovery merged into the sparse weights "
                    "(baselines: plain LoRA, none)", _configure_losa, _run_losa),
    "eval": Command("perplexity and zero-shot accuracy of a checkpoint", _configure_eval, _run_eval),
    "export": Command("convert a checkpoint for other tools", _configure_export, _run_export),
    "info": Command("show a checkpoint's manifest summary", _configure_info, _run_info),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-compress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    from compress.assets import AssetError
    from compress.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, OSError, AssetError, CheckpointError) as err:  # user errors: one clear line
        print(f"sparse-compress {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
