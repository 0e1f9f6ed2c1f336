"""The losses of Mask R-CNN: L = L_cls + L_loc + L_mask, plus the RPN's own two.

- RPN: binary cross-entropy on the objectness of a balanced anchor sample, and smooth L1
  (beta 1/9) on the box deltas of its positives, normalised by the sample size.
- L_cls: cross-entropy over the classes of the sampled proposals.
- L_loc: smooth L1 (beta 1/9) on the deltas predicted for each positive's true class,
  normalised by the number of sampled proposals.
- L_mask: per-pixel binary cross-entropy on the mask predicted for each positive's true class
  only (the paper's decoupling of mask and class, section 3), against the ground-truth mask
  cropped and resized to the proposal by RoIAlign.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maskray.model.ops import roi_align
from maskray.model.sampler import BalancedSampler

SMOOTH_L1_BETA = 1.0 / 9


def rpn_losses(
    objectness: Tensor, deltas: Tensor, labels: list[Tensor], regression_targets: Tensor, sampler: BalancedSampler
) -> tuple[Tensor, Tensor]:
    """(objectness loss, box loss) over anchors of all images, flattened alike."""
    positive_masks, negative_masks = sampler(labels)
    positive = torch.where(torch.cat(positive_masks))[0]
    negative = torch.where(torch.cat(negative_masks))[0]
    sampled = torch.cat([positive, negative])
    labels = torch.cat(labels)
    box_loss = F.smooth_l1_loss(
        deltas[positive], regression_targets[positive], beta=SMOOTH_L1_BETA, reduction="sum"
    ) / sampled.numel()
    objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
    return objectness_loss, box_loss


def fast_rcnn_losses(
    class_logits: Tensor, box_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """(L_cls, L_loc) over the sampled proposals of all images."""
    labels = torch.cat(labels)
    regression_targets = torch.cat(regression_targets)
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    per_class = box_deltas.reshape(box_deltas.shape[0], -1, 4)
    box_loss = F.smooth_l1_loss(
        per_class[positive, labels[positive]], regression_targets[positive], beta=SMOOTH_L1_BETA, reduction="sum"
    ) / labels.numel()
    return classification_loss, box_loss


def mask_targets(gt_masks: Tensor, proposals: Tensor, matched: Tensor, size: int) -> Tensor:
    """Each proposal's matched ground-truth mask, cropped to the proposal and resized to size x size."""
    rois = torch.cat([matched[:, None].to(proposals), proposals], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0)[:, 0]


def mask_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    matched: list[Tensor],
) -> Tensor:
    """L_mask: binary cross-entropy of each positive's mask for its ground-truth class."""
    size = mask_logits.shape[-1]
    labels = torch.cat([image_labels[idx] for image_labels, idx in zip(gt_labels, matched)])
    targets = torch.cat(
        [mask_targets(masks, boxes, idx, size) for masks, boxes, idx in zip(gt_masks, proposals, matched)]
    )
    if targets.numel() == 0:
        # No positives: a zero that still depends on the logits, so every rank's graph matches.
        return mask_logits.sum() * 0
    chosen = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, targets)
