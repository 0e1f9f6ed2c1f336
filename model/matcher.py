"""Matching predictions (anchors, proposals) to ground-truth boxes by IoU."""

from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    """Assigns each prediction the ground truth it overlaps most, or a negative code.

    A prediction whose best IoU is at least ``high`` is matched; below ``low`` it is
    ``BELOW_LOW`` (background); in between it is ``BETWEEN`` (ignored). With
    ``allow_low_quality_matches`` every ground truth also keeps the predictions that overlap it
    most even below ``high``, so that no object goes without a positive (the RPN's rule, Faster
    R-CNN section 3.1.2).
    """

    BELOW_LOW = -1
    BETWEEN = -2

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool = False):
        if low > high:
            raise ValueError(f"Matcher: low threshold {low} is above the high threshold {high}")
        self.high = high
        self.low = low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """``iou`` is Tensor[G, P] (ground truths x predictions); returns int64 Tensor[P]."""
        if iou.numel() == 0:
            which = "ground-truth boxes" if iou.shape[0] == 0 else "predictions"
            raise ValueError(f"Matcher: no {which} to match (IoU matrix of shape {tuple(iou.shape)})")
        best_iou, matches = iou.max(dim=0)
        best_gt = matches.clone() if self.allow_low_quality_matches else None
        matches[best_iou < self.low] = self.BELOW_LOW
        matches[(best_iou >= self.low) & (best_iou < self.high)] = self.BETWEEN
        if best_gt is not None:
            # Predictions tied for the best IoU with some ground truth get their best match back.
            best_for_gt = iou.max(dim=1).values
            predictions = torch.where(iou == best_for_gt[:, None])[1]
            matches[predictions] = best_gt[predictions]
        return matches
