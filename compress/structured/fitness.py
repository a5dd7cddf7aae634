"""Perplexity of the model pruned by a set of layer plans, without changing the model.

Contract: :class:`PlanPerplexity` embeds its token windows once; each call
runs them through the decoder one layer at a time, every layer temporarily
replaced by its pruned version (:func:`compress.structured.surgery.temporarily_pruned`,
from statistics computed once), and returns the perplexity. The model is the
same object, unchanged, afterwards. One call costs one forward pass of the
pruned model plus slicing the kept weights - what makes Self-Pruner's
hundreds of candidates affordable.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from compress.eval.perplexity import window_nll
from compress.sparsity.runner import SequentialRunner
from compress.structured.stats import LayerInputStats
from compress.structured.surgery import LayerPlan, temporarily_pruned
from compress.structured.flap import means_of


class PlanPerplexity:
    """Perplexity of ``model`` on ``windows`` [W, T] as pruned by any list of layer plans."""

    def __init__(self, model: nn.Module, windows: Tensor, stats: Sequence[LayerInputStats],
                 bias_compensation: bool, batch_size: int = 4):
        self.runner = SequentialRunner(model, windows, batch_size, progress=False)
        self.runner.capture_inputs()
        self.inputs = self.runner.hidden  # [W, T, D] inputs of layer 0
        self.stats = stats
        self.bias_compensation = bias_compensation

    @torch.no_grad()
    def __call__(self, plans: Sequence[LayerPlan] | None) -> float:
        """Perplexity with every layer pruned by its plan (``None``: the dense model)."""
        runner, adapter = self.runner, self.runner.adapter
        hidden = self.inputs
        for i, layer in enumerate(adapter.layers()):
            if plans is None:
                hidden = runner.forward(layer, hidden)
                continue
            with temporarily_pruned(adapter, i, plans[i], means_of(self.stats[i], self.bias_compensation)) as pruned:
                hidden = runner.forward(pruned, hidden)
        ids = runner.token_ids  # [W, T]
        dtype = next(runner.model.parameters()).dtype
        total = sum(float(window_nll(adapter.logits(hidden[w:w + 1].to(dtype)), ids[w:w + 1]).sum())
                    for w in range(len(ids)))
        return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))
