"""The optimiser and its learning-rate schedule: a linear warm-up, then step or cosine decay."""

from __future__ import annotations

import bisect
import math

import torch

from maskray.pipeline.train.settings import TrainSettings


def steps_at_epochs(epochs: tuple[int, ...], steps_per_epoch: int) -> list[int]:
    return sorted(e * steps_per_epoch for e in epochs)


def default_lr_steps(epochs: int) -> tuple[int, ...]:
    """Decay after 2/3 and 8/9 of the run (torchvision's 16 and 22 of 26 epochs, near enough)."""
    return tuple(sorted({max(1, round(epochs * 2 / 3)), max(1, round(epochs * 8 / 9))} - {epochs}))


def lr_factor(step: int, total_steps: int, warmup_iters: int, warmup_factor: float, schedule: str,
              milestones: list[int], gamma: float) -> float:
    """The learning rate of ``step`` as a multiple of the base rate: a linear warm-up from
    ``warmup_factor``, times a step decay (``gamma`` at each milestone) or a cosine to zero."""
    warm = 1.0
    if step < warmup_iters:
        warm = warmup_factor + (1 - warmup_factor) * step / warmup_iters
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    else:
        decay = gamma ** bisect.bisect_right(milestones, step)
    return warm * decay


def make_optimizer(model: torch.nn.Module, settings: TrainSettings, steps_per_epoch: int):
    """SGD over the trainable parameters and its per-step schedule, as ``settings`` asks.
    Returns (parameters, optimizer, scheduler); bench/train.py's plain loop uses it too."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=settings.base_lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    total_steps = settings.epochs * steps_per_epoch
    milestones = steps_at_epochs(settings.lr_steps or default_lr_steps(settings.epochs), steps_per_epoch)
    warmup = min(settings.warmup_iters, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, settings.warmup_factor, settings.schedule,
                                          milestones, settings.lr_gamma))
    return parameters, optimizer, scheduler

