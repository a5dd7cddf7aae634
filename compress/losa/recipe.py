"""The typed recipe of ``sparse-compress losa``.

Contract: a :class:`LosaRecipe` is everything that decides the result of a
LoSA run (or of one of its baselines); unknown keys are rejected with the key
named, illegal values with the legal range, before any work starts. It is
saved into the output manifest. Top-level scalar fields are CLI flags; nested
sections are set with ``--set section.key=value``. Defaults are the paper's
(``../shared/docs/algorithms.md`` section 3) unless a comment says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.eval import EvalConfig
from compress.sparsity.recipe import CalibrationConfig, RmiConfig, SparseGptConfig, read_recipe_file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Section):
    """How each round's short fine-tuning runs."""

    seq_len: int = Field(512, ge=8, description="tokens per training sequence (longer ones are cut)")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (None: off)")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup at the start of every round")
    autocast: bool = Field(True, description="bf16 autocast for training and calibration passes (CPU or GPU)")
    gradient_checkpointing: bool = Field(True, description="recompute layer activations in the backward pass")
    train_on_prompt: bool = Field(False, description="instruction data: also learn the prompt tokens")
    seed: int = Field(0, description="seed of the data order and the dropout")


class LosaRecipe(_Section):
    """A complete LoSA (or baseline) recipe."""

    mode: Literal["losa", "lora", "none"] = Field(
        "losa", description="losa: progressive masked LoRA; lora: one-shot prune + plain LoRA (merge densifies); "
                            "none: one-shot prune, no recovery")
    method: Literal["wanda", "sparsegpt", "magnitude"] = Field("wanda", description="pruning criterion")
    sparsity: float = Field(0.7, ge=0, lt=1, description="final sparsity of the decoder linears")
    allocation: Literal["rmi", "uniform"] = Field("rmi", description="per-layer sparsity allocation")
    rounds: int = Field(5, ge=1, description="progressive rounds T (cubic schedule)")
    data: str = Field("calibration", description="training data: a text split or .txt file, or a .jsonl of "
                                                 "instructions (instruction/input/output or messages)")
    steps_per_round: int = Field(20, ge=0, description="optimizer steps of fine-tuning per round")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    r_max: int = Field(32, ge=1, description="adapters are created at this rank and sliced per layer")
    rank_start: int = Field(6, ge=1, description="mean rank in round 1")
    rank_step: int = Field(1, ge=0, description="mean rank growth per round")
    alpha_ratio: float = Field(2.0, gt=0, description="LoRA alpha / r (alpha = 2r)")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout (0 is faster: one matmul per linear)")
    error_samples: int = Field(8, ge=1, description="calibration sequences for the layer reconstruction error")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights while training (master copy)")
    save_dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="dtype of the output checkpoint")
    calibration: CalibrationConfig = Field(default_factory=lambda: CalibrationConfig(samples=64))
    rmi: RmiConfig = Field(default_factory=RmiConfig)
    sparsegpt: SparseGptConfig = Field(default_factory=SparseGptConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig | None = Field(default_factory=lambda: EvalConfig(max_windows=8),
                                    description="evaluation of the output (None: skip)")

    @model_validator(mode="after")
    def _consistent(self) -> "LosaRecipe":
        if self.calibration.source == "eval" or self.data == "eval":
            raise ValueError("the eval split is for evaluation only; calibrate and train on 'calibration' "
                             "or your own file")
        if self.error_samples > self.calibration.samples:
            raise ValueError(f"error_samples ({self.error_samples}) cannot exceed calibration.samples "
                             f"({self.calibration.samples})")
        if self.rmi.samples > self.calibration.samples:
            raise ValueError(f"rmi.samples ({self.rmi.samples}) cannot exceed calibration.samples "
                             f"({self.calibration.samples})")
        if self.final_rank() > self.r_max:
            raise ValueError(f"the mean rank reaches {self.final_rank()} in round {self.rounds}, above "
                             f"r_max = {self.r_max}; raise r_max")
        if self.eval is not None:
            self.eval.task_names()  # unknown task names fail now
        return self

    def final_rank(self) -> int:
        return self.rank_start + (self.rounds - 1) * self.rank_step

    def rmi_gamma(self) -> float:
        return self.rmi.gamma or (100.0 if self.method == "sparsegpt" else 1.0)


def parse_losa_recipe(raw: dict, where: str = "recipe") -> LosaRecipe:
    """Validate a recipe dict; errors name the offending key."""
    try:
        return LosaRecipe(**raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}"
                             for e in err.errors())
        raise ValueError(f"{where}: {problems}") from None


def load_losa_recipe(path: str | Path) -> LosaRecipe:
    """A validated recipe from a YAML file."""
    return parse_losa_recipe(read_recipe_file(path), where=str(path))
