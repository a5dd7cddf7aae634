"""Typed recipes for structured pruning (``sparse-compress flap``) and Self-Pruner (``self-prune``).

Contract: a recipe is everything that decides the result; it is validated
before any work (unknown keys rejected with the key named, illegal values with
the legal range), saved into the output manifest with every default resolved,
and loadable from YAML. CLI flags are generated from the top-level fields.

``method`` is a preset (:data:`METHOD_PRESETS`): ``flap`` = WIFV metric,
al-am structure, bias compensation, statistics of the dense model;
``wanda-sp`` = Wanda's structured score, ul-um, no bias, layers pruned in
sequence (each layer's statistics come from the already-pruned layers before
it, as in the FLAP paper's baseline). Any field given explicitly overrides
the preset.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.sparsity.recipe import CalibrationConfig, read_recipe_file

MetricName = Literal["ifv", "wifv", "wifn", "wanda"]
StructureName = Literal["al-am", "ul-um", "layer-rates"]

METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "flap": {"metric": "wifv", "structure": "al-am", "bias_compensation": True, "sequential": False},
    "wanda-sp": {"metric": "wanda", "structure": "ul-um", "bias_compensation": False, "sequential": True},
}


class StructuredCalibration(CalibrationConfig):
    """Calibration text for FLAP's statistics (the reference uses 1024 x 128 tokens)."""

    samples: int = Field(512, ge=1, description="calibration sequences")
    seq_len: int = Field(128, ge=8, description="tokens per calibration sequence")
    batch_size: int = Field(32, ge=1, description="sequences per forward pass")


class StructuredSettings(BaseModel):
    """What every structured prune shares: target, metric, limits, calibration."""

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of the decoder linears' parameters to remove")
    metric: MetricName | None = Field(None, description="channel importance; unset: the method preset's")
    bias_compensation: bool | None = Field(
        None, description="add W[:, removed] @ mean(x_removed) as o_proj/down_proj bias; unset: the preset's")
    min_kv_groups: int = Field(1, ge=1, description="KV groups (a KV head with its query heads) every layer keeps")
    min_mlp_width: int = Field(32, ge=1, description="MLP channels every layer keeps (rounded up to the multiple)")
    mlp_multiple: int = Field(32, ge=1, description="every kept MLP width is a multiple of this")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="compute and output dtype")
    calibration: StructuredCalibration = Field(default_factory=StructuredCalibration)

    @property
    def min_blocks(self) -> int:
        return -(-self.min_mlp_width // self.mlp_multiple)

    def _check_sources(self, *sources: str) -> None:
        if "eval" in (self.calibration.source, *sources):
            raise ValueError("the eval split is for evaluation only; calibrate and select on "
                             "'calibration' / 'selection' or your own file")


class FlapRecipe(StructuredSettings):
    """A FLAP / Wanda-sp structured prune."""

    method: Literal["flap", "wanda-sp"] = Field("flap", description="preset of the fields below")
    structure: StructureName | None = Field(
        None, description="al-am (global), ul-um (uniform) or layer-rates; unset: the preset's")
    rates: list[float] | None = Field(None, description="per-layer rates (structure: layer-rates)")
    sequential: bool | None = Field(
        None, description="prune each layer before the next one's statistics (not with al-am); unset: the preset's")

    @model_validator(mode="after")
    def _resolve(self) -> "FlapRecipe":
        for key, value in METHOD_PRESETS[self.method].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.structure == "layer-rates" and not self.rates:
            raise ValueError("structure: layer-rates needs rates: [one rate per layer]")
        if self.rates and self.structure != "layer-rates":
            raise ValueError("rates are only used with structure: layer-rates")
        if self.sequential and self.structure == "al-am":
            raise ValueError("al-am ranks all layers at once, so it needs the dense statistics; "
                             "use sequential: false or structure ul-um / layer-rates")
        if self.rates and any(not 0 <= r < 1 for r in self.rates):
            raise ValueError("every rate must lie in [0, 1)")
        self._check_sources()
        return self


class SelfPruneRecipe(StructuredSettings):
    """Self-Pruner: evolutionary search of per-layer rates, then a FLAP prune with the best ones."""

    population: int = Field(30, ge=2, description="population size (paper: 30)")
    crossovers: int = Field(10, ge=0, description="crossover offspring per generation (paper: 10)")
    mutations: int = Field(10, ge=0, description="mutation offspring per generation (paper: 10)")
    generations: int = Field(20, ge=0, description="generations after the initial population (paper: 20)")
    min_rate: float = Field(0.0, ge=0, lt=1, description="lowest rate of any layer")
    max_rate: float = Field(0.9, gt=0, lt=1, description="highest rate of any layer (also capped by the minimums)")
    init_spread: float = Field(0.1, ge=0, description="std of the classical initial population around the target")
    mutation_sigma: float = Field(0.05, gt=0, description="std of a classical mutation step")
    seed: int = Field(0, description="seed of the classical operators")
    selection_source: str = Field("selection", description="held-out text of the fitness (never eval)")
    selection_seq_len: int = Field(512, ge=8, description="tokens per fitness window")
    selection_windows: int = Field(8, ge=1, description="fitness windows")
    llm_base_url: str | None = Field(None, description="OpenAI-compatible endpoint of the LLM operator "
                                                       "(e.g. http://127.0.0.1:8000/v1); none: classical operators")
    llm_model: str | None = Field(None, description="model name at the endpoint (default: the first it lists)")
    llm_api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    llm_timeout_s: float = Field(120.0, gt=0, description="seconds to wait for one LLM answer")
    llm_temperature: float = Field(0.7, ge=0, description="sampling temperature of the LLM operator")
    llm_max_tokens: int = Field(4096, ge=64, description="most tokens of one LLM answer")

    @model_validator(mode="after")
    def _resolve(self) -> "SelfPruneRecipe":
        if self.metric is None:
            self.metric = "wifv"
        if self.bias_compensation is None:
            self.bias_compensation = True
        if not self.min_rate <= self.ratio <= self.max_rate:
            raise ValueError(f"ratio {self.ratio} must lie within [min_rate, max_rate] = "
                             f"[{self.min_rate}, {self.max_rate}]")
        self._check_sources(self.selection_source)
        return self


def parse_structured(cls: type[StructuredSettings], raw: dict, where: str = "recipe") -> StructuredSettings:
    """Validate a recipe dict into ``cls``; errors name the offending key."""
    try:
        return cls(**raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}"
                             for e in err.errors())
        raise ValueError(f"{where}: {problems}") from None


def load_structured(cls: type[StructuredSettings], path: str) -> StructuredSettings:
    """A validated recipe of type ``cls`` from a YAML file."""
    return parse_structured(cls, read_recipe_file(path), where=str(path))
