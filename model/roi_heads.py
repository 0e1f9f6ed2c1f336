"""The RoI heads: from proposals to scored, classified boxes and their masks.

In training, the proposals (plus the ground-truth boxes) are matched to the ground truth at
IoU 0.5 and a balanced sample of 512 per image (a quarter positive) is pooled and given the
box losses; the positives also get the mask loss. At inference, every proposal is scored for
every class, decoded, and filtered (score threshold, NMS per class, the top 100); the mask
head then runs on the final detections only (the paper's section 3.1, "Inference").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from maskray.model.box_coder import BoxCoder
from maskray.model.box_head import BoxHead, BoxPredictor, ConvFCBoxHead
from maskray.model.config import MaskRCNNConfig
from maskray.model.losses import fast_rcnn_losses, mask_loss
from maskray.model.mask_head import MaskHead, MaskPredictor
from maskray.model.matcher import Matcher
from maskray.model.ops import MultiScaleRoIAlign, MultiScaleRoIPool
from maskray.model.sampler import BalancedSampler

FPN_LEVELS = ("0", "1", "2", "3")


def build_pooler(kind: str, output_size: int, sampling_ratio: int) -> nn.Module:
    """RoIAlign (bilinear, no quantisation) or RoIPool (quantised max), over P2..P5."""
    if kind == "roi_align":
        return MultiScaleRoIAlign(FPN_LEVELS, output_size, sampling_ratio)
    return MultiScaleRoIPool(FPN_LEVELS, output_size)


class RoIHeads(nn.Module):
    def __init__(
        self,
        box_pooler: nn.Module,
        box_head: BoxHead | ConvFCBoxHead,
        box_predictor: BoxPredictor,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights: tuple[float, float, float, float],
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        mask_pooler: nn.Module | None = None,
        mask_head: MaskHead | None = None,
        mask_predictor: MaskPredictor | None = None,
    ):
        super().__init__()
        # Attribute names are torchvision's, so state dict keys match (roi_heads.box_head.fc6...).
        self.box_roi_pool = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_roi_pool = mask_pooler
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    @classmethod
    def from_config(cls, config: MaskRCNNConfig, in_channels: int) -> RoIHeads:
        box_pooler = build_pooler(config.pooler, config.box_pool_size, config.pool_sampling_ratio)
        mask_parts: dict[str, nn.Module] = {}
        if config.mask:
            mask_parts = dict(
                mask_pooler=build_pooler(config.pooler, config.mask_pool_size, config.pool_sampling_ratio),
                mask_head=MaskHead(in_channels, config.mask_head_channels, config.mask_head_layers,
                                   config.head_norm, config.fold_batchnorm),
                mask_predictor=MaskPredictor(config.mask_head_channels, config.mask_head_channels, config.num_classes),
            )
        if config.box_head_convs == 0:
            box_head: nn.Module = BoxHead(in_channels * config.box_pool_size**2, config.representation_size)
        else:
            box_head = ConvFCBoxHead(in_channels, config.box_pool_size, config.box_head_convs, config.box_head_channels,
                                     config.representation_size, config.head_norm, config.fold_batchnorm)
        return cls(
            box_pooler,
            box_head,
            BoxPredictor(config.representation_size, config.num_classes),
            fg_iou_thresh=config.box_fg_iou_thresh,
            bg_iou_thresh=config.box_bg_iou_thresh,
            batch_size_per_image=config.box_batch_size_per_image,
            positive_fraction=config.box_positive_fraction,
            bbox_reg_weights=config.bbox_reg_weights,
            score_thresh=config.box_score_thresh,
            nms_thresh=config.box_nms_thresh,
            detections_per_img=config.box_detections_per_img,
            **mask_parts,
        )

    @property
    def has_mask(self) -> bool:
        return self.mask_head is not None

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """In training, the losses; at inference, per image boxes, scores, labels (and mask_probs)."""
        if self.training:
            return [], self.losses(features, proposals, image_sizes, targets)
        return self.detect(features, proposals, image_sizes), {}

    # training -----------------------------------------------------------------------------

    def sample_proposals(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: sampled proposals, their matched ground-truth index, class label, box targets."""
        sampled_proposals, sampled_matches, sampled_labels, regression_targets = [], [], [], []
        labels_per_image, matches_per_image = [], []
        # The ground-truth boxes join the proposals: early in training they are the only good ones.
        proposals = [torch.cat((p, t["boxes"].to(p.dtype))) for p, t in zip(proposals, targets)]
        for image_proposals, target in zip(proposals, targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:
                matches = torch.zeros(image_proposals.shape[0], dtype=torch.int64, device=image_proposals.device)
                labels = torch.zeros_like(matches)
            else:
                raw = self.matcher(box_iou(gt_boxes, image_proposals))
                matches = raw.clamp(min=0)
                labels = target["labels"][matches].to(torch.int64)
                labels[raw == Matcher.BELOW_LOW] = 0
                labels[raw == Matcher.BETWEEN] = -1
            labels_per_image.append(labels)
            matches_per_image.append(matches)

        positive_masks, negative_masks = self.sampler(labels_per_image)
        for image_proposals, target, labels, matches, positive, negative in zip(
            proposals, targets, labels_per_image, matches_per_image, positive_masks, negative_masks
        ):
            keep = torch.where(positive | negative)[0]
            image_proposals, labels, matches = image_proposals[keep], labels[keep], matches[keep]
            gt_boxes = target["boxes"].to(image_proposals.dtype)
            if gt_boxes.numel() == 0:
                gt_boxes = torch.zeros((1, 4), dtype=image_proposals.dtype, device=image_proposals.device)
            sampled_proposals.append(image_proposals)
            sampled_labels.append(labels)
            sampled_matches.append(matches)
            regression_targets.append(self.box_coder.encode(gt_boxes[matches], image_proposals))
        return sampled_proposals, sampled_matches, sampled_labels, regression_targets

    def losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None,
    ) -> dict[str, Tensor]:
        if targets is None:
            raise ValueError("RoIHeads: targets are needed in training mode")
        proposals, matches, labels, regression_targets = self.sample_proposals(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        loss_classifier, loss_box_reg = fast_rcnn_losses(class_logits, box_deltas, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask:
            positives = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_proposals = [p[pos] for p, pos in zip(proposals, positives)]
            mask_matches = [m[pos] for m, pos in zip(matches, positives)]
            pooled = self.mask_roi_pool(features, mask_proposals, image_sizes)
            mask_logits = self.mask_predictor(self.mask_head(pooled))
            losses["loss_mask"] = mask_loss(
                mask_logits,
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                mask_matches,
            )
        return losses

    # inference ----------------------------------------------------------------------------

    def detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        detections = self.select_detections(class_logits, box_deltas, proposals, image_sizes)
        if self.has_mask:
            boxes = [d["boxes"] for d in detections]
            labels = torch.cat([d["labels"] for d in detections])
            pooled = self.mask_roi_pool(features, boxes, image_sizes)
            if labels.numel() > 0:
                # float32 probabilities: the mask threshold is applied to them, whatever autocast ran in.
                probs = self.mask_predictor.logits_for(self.mask_head(pooled), labels).float().sigmoid()
            else:
                size = 2 * self.mask_roi_pool.output_size[0]
                probs = pooled.new_zeros((0, size, size), dtype=torch.float32)
            for detection, image_probs in zip(detections, probs.split([len(b) for b in boxes])):
                detection["mask_probs"] = image_probs
        return detections

    def select_detections(
        self, class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image: each proposal decoded once per class, filtered and NMSed per class."""
        num_classes = class_logits.shape[-1]
        counts = [p.shape[0] for p in proposals]
        boxes_all = self.box_coder.decode(box_deltas, torch.cat(proposals))
        scores_all = F.softmax(class_logits.float(), -1)
        detections = []
        for boxes, scores, image_size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
            boxes = clip_boxes_to_image(boxes, image_size)
            labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
            # Column 0 is the background class.
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections
