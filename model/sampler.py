"""Sampling a balanced minibatch of positives and negatives for a loss."""

from __future__ import annotations

import torch
from torch import Tensor


class BalancedSampler:
    """Up to ``batch_size * positive_fraction`` positives (label >= 1), the rest negatives (0).

    Labels of -1 are ignored. Draws are uniform without replacement (``torch.randperm``), so a
    seeded generator gives the same minibatch each time.
    """

    def __init__(self, batch_size: int, positive_fraction: float):
        self.batch_size = batch_size
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image, boolean masks over ``labels`` of the sampled positives and negatives."""
        positive_masks, negative_masks = [], []
        for image_labels in labels:
            positive = torch.where(image_labels >= 1)[0]
            negative = torch.where(image_labels == 0)[0]
            num_positive = min(positive.numel(), int(self.batch_size * self.positive_fraction))
            num_negative = min(negative.numel(), self.batch_size - num_positive)
            chosen_positive = positive[torch.randperm(positive.numel(), device=positive.device)[:num_positive]]
            chosen_negative = negative[torch.randperm(negative.numel(), device=negative.device)[:num_negative]]
            positive_mask = torch.zeros_like(image_labels, dtype=torch.bool)
            negative_mask = torch.zeros_like(image_labels, dtype=torch.bool)
            positive_mask[chosen_positive] = True
            negative_mask[chosen_negative] = True
            positive_masks.append(positive_mask)
            negative_masks.append(negative_mask)
        return positive_masks, negative_masks
