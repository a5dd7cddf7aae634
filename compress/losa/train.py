"""The short fine-tuning LoSA runs after every round, and the loss it is judged by.

Contract: :func:`fine_tune` trains only the parameters it is given (the LoRA
A and B) with AdamW on the given batches, ``grad_accum`` micro-batches per
optimizer step, optionally under bf16 autocast and with gradient
checkpointing; it returns the loss of every optimizer step and leaves the
model in eval mode with checkpointing off. :func:`mean_loss` is the
no-gradient loss of a fixed set of batches (used before and after each
round's fine-tuning).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.losa.data import Batch
from compress.losa.recipe import TrainConfig


def autocast(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device type (CPU included) when ``enabled``."""
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def training_mode(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    """model.train() (and gradient checkpointing) inside, eval mode without checkpointing after."""
    model.train()
    # transformers 5.x renamed gradient_checkpointing_* to activation_checkpointing_* (old names deprecated)
    new_api = hasattr(model, "activation_checkpointing_enable")
    if checkpointing and new_api:
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if checkpointing and new_api:
            model.activation_checkpointing_disable()
        elif checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def fine_tune(model: nn.Module, params: list[nn.Parameter], batches: list[Batch], lr: float,
              config: TrainConfig, progress: bool = True, desc: str = "fine-tune") -> list[float]:
    """AdamW on ``params`` over ``batches`` (len = steps * grad_accum); the loss of every step."""
    accum = config.grad_accum
    steps = len(batches) // accum
    if steps == 0:
        return []
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    warmup = max(config.warmup_steps, 0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step")
    with training_mode(model, config.gradient_checkpointing):
        for step in bar:
            total = 0.0
            for batch in batches[step * accum:(step + 1) * accum]:
                with autocast(model, config.autocast):
                    loss = model(**_to(batch, device), use_cache=False).loss
                (loss / accum).backward()
                total += float(loss.detach()) / accum
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
    return losses


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Batch], use_autocast: bool) -> float:
    """Mean (over batches) of the model's loss, in eval mode, no gradients."""
    if not batches:
        return float("nan")
    device = next(model.parameters()).device
    model.eval()
    total = 0.0
    for batch in batches:
        with autocast(model, use_autocast):
            total += float(model(**_to(batch, device), use_cache=False).loss)
    return total / len(batches)
