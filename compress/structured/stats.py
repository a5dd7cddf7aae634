"""Streaming per-channel statistics of the inputs of the linears that FLAP prunes by column.

Contract: :class:`ChannelStats` accumulates, over every calibration token, the
mean, the variance (Welford / Chan's parallel merge, in float64 so the order
of batches does not matter to within rounding) and the mean square of each
input channel of one linear. It is exact for any number of batches and
serialises to plain tensors, so the statistics of a whole model are computed
once and reused (by FLAP's final prune and by every Self-Pruner candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ChannelStats:
    """Running count, mean and sum of squared deviations of C input channels."""

    count: int
    mean: Tensor  # [C] float64
    m2: Tensor  # [C] float64, sum over tokens of (x - mean)^2

    @classmethod
    def empty(cls, channels: int) -> "ChannelStats":
        zeros = torch.zeros(channels, dtype=torch.float64)
        return cls(0, zeros, zeros.clone())

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add every token of ``x`` [..., C]."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)  # [n, C]
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(dim=0)  # [C]
        batch_m2 = (x - batch_mean).pow(2).sum(dim=0)  # [C]
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> Tensor:
        """Unbiased variance of every channel [C] (0 with fewer than two tokens)."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def mean_square(self) -> Tensor:
        """E[X_j^2] over the tokens [C]."""
        return self.m2 / max(self.count, 1) + self.mean.pow(2)

    @property
    def sq_norm(self) -> Tensor:
        """||X_j||_2^2 over all tokens [C] (Wanda's statistic)."""
        return self.mean_square * self.count

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.m2": self.m2,
                f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str) -> "ChannelStats":
        return cls(int(tensors[f"{prefix}.count"][0]), tensors[f"{prefix}.mean"], tensors[f"{prefix}.m2"])


@dataclass
class LayerInputStats:
    """The statistics FLAP needs from one decoder layer: inputs of o_proj and of down_proj."""

    attn: ChannelStats  # [num_heads * head_dim] channels, the input of o_proj
    mlp: ChannelStats  # [intermediate_size] channels, the input of down_proj

    def to_tensors(self, index: int) -> dict[str, Tensor]:
        return {**self.attn.to_tensors(f"{index}.attn"), **self.mlp.to_tensors(f"{index}.mlp")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], index: int) -> "LayerInputStats":
        return cls(ChannelStats.from_tensors(tensors, f"{index}.attn"),
                   ChannelStats.from_tensors(tensors, f"{index}.mlp"))
