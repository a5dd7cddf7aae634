"""Typed recipes for layer-wise unstructured / N:M pruning.

Contract: a :class:`PruneRecipe` is everything that decides the result of
``sparse-compress prune``; it is validated before any work starts (unknown
keys are rejected with the key named, illegal values with the legal range),
saved into the output manifest, and loadable from YAML. CLI flags are
generated from its top-level fields.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Section):
    """Which text calibrates the statistics, and how much of it."""

    source: str = Field("calibration", description="text split or file (never the eval split)")
    samples: int = Field(128, ge=1, description="calibration sequences")
    seq_len: int = Field(512, ge=8, description="tokens per calibration sequence")
    seed: int = Field(0, description="seed for drawing the sequences")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")


class AtpConfig(_Section):
    """ATP: s_i = S - beta (L-1)/2 + i beta; beta searched when not given."""

    beta: float | None = Field(None, ge=0, description="common difference; None: grid search")
    step: float = Field(0.002, gt=0, description="grid step of the beta search")
    selection_source: str = Field("selection", description="held-out text that picks beta (never eval)")
    selection_seq_len: int = Field(1024, ge=8)
    selection_windows: int | None = Field(None, ge=1, description="windows of the selection text (all)")


class OwlConfig(_Section):
    """OWL: layers with more outliers (score > m * mean) get less sparsity, within +-lam."""

    lam: float = Field(0.08, ge=0, lt=1)
    m: float = Field(5.0, gt=0)


class RmiConfig(_Section):
    """RMI: layer redundancy from linear CKA of layer inputs, then an exact LP."""

    gamma: float | None = Field(None, gt=0, description="None: 1 with wanda/magnitude, 100 with sparsegpt")
    delta: float | None = Field(None, gt=0, lt=1, description="None: 0.01 / 0.02 / 0.03 by target")
    samples: int = Field(16, ge=2, description="calibration sequences used for the representations")


class SparseGptConfig(_Section):
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0)


class PruneRecipe(_Section):
    """A complete pruning recipe."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field("wanda", description="pruning criterion")
    sparsity: float = Field(0.5, ge=0, lt=1, description="target sparsity of the targeted linears")
    pattern: str = Field("unstructured", description="unstructured, 2:4 or 4:8")
    allocation: Literal["uniform", "owl", "atp", "rmi", "explicit"] = Field(
        "uniform", description="per-layer sparsity allocation")
    rates: list[float] | None = Field(None, description="explicit per-layer sparsities (allocation: explicit)")
    targets: list[str] = Field(default_factory=lambda: ["Linear"],
                               description="linears to prune: 'Linear' (all), 're:REGEX' or a glob")
    ignore: list[str] = Field(default_factory=list, description="linears to keep dense (same forms)")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="calibration compute dtype")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    atp: AtpConfig = Field(default_factory=AtpConfig)
    owl: OwlConfig = Field(default_factory=OwlConfig)
    rmi: RmiConfig = Field(default_factory=RmiConfig)
    sparsegpt: SparseGptConfig = Field(default_factory=SparseGptConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "PruneRecipe":
        from compress.sparsity.pruners import parse_pattern, pattern_sparsity

        nm = parse_pattern(self.pattern)
        if nm is not None:
            if self.allocation != "uniform":
                raise ValueError(f"pattern {self.pattern} fixes every layer's sparsity; use allocation: uniform")
            self.sparsity = pattern_sparsity(nm)
        if self.allocation == "explicit" and not self.rates:
            raise ValueError("allocation: explicit needs rates: [one sparsity per layer]")
        if self.rates and self.allocation != "explicit":
            raise ValueError("rates are only used with allocation: explicit")
        if self.calibration.source == "eval" or self.atp.selection_source == "eval":
            raise ValueError("the eval split is for evaluation only; calibrate and select on "
                             "'calibration' / 'selection' or your own file")
        return self

    def rmi_gamma(self) -> float:
        return self.rmi.gamma or (100.0 if self.method == "sparsegpt" else 1.0)


def matches(name: str, patterns: list[str]) -> bool:
    """llm-compressor style target matching on a linear's full module name."""
    for pattern in patterns:
        if pattern == "Linear":
            return True
        if pattern.startswith("re:") and re.search(pattern[3:], name):
            return True
        if fnmatch(name, pattern) or name.endswith(pattern):
            return True
    return False


def read_recipe_file(path: str | Path) -> dict:
    """The raw field mapping of a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of fields, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path) -> PruneRecipe:
    """A validated recipe from a YAML file."""
    return parse_recipe(read_recipe_file(path), where=str(path))


def parse_recipe(raw: dict, where: str = "recipe") -> PruneRecipe:
    """Validate a recipe dict; errors name the offending key."""
    try:
        return PruneRecipe(**raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}"
                             for e in err.errors())
        raise ValueError(f"{where}: {problems}") from None
