"""The Region Proposal Network (Faster R-CNN, section 3.1), run over every FPN level.

A shared 3x3 conv head predicts, at every anchor, an objectness logit and four box deltas
(v2, torchvision's ``*_resnet50_fpn_v2``: two 3x3 convs, ``rpn_head_convs=2``).
Proposals are the decoded anchors: the top-k per level by objectness, clipped to the image,
then non-maximum suppression within each level. In training the anchors are matched to the
ground truth (IoU >= 0.7 positive, < 0.3 negative) and a balanced sample of them gives the
RPN's two losses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from maskray.model.anchors import AnchorGenerator
from maskray.model.box_coder import BoxCoder
from maskray.model.config import MaskRCNNConfig
from maskray.model.losses import rpn_losses
from maskray.model.matcher import Matcher
from maskray.model.sampler import BalancedSampler


class RPNHead(nn.Module):
    """``convs`` x (3x3 conv + ReLU), then 1x1 convs for objectness (A per cell) and box deltas (4A)."""

    def __init__(self, channels: int, num_anchors: int, convs: int = 1):
        super().__init__()
        # Nested Sequentials keep torchvision's key names (conv.0.0.weight, conv.1.0.weight).
        self.conv = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)) for _ in range(convs))
        )
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, 4 * num_anchors, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints from before torchvision 0.12 (COCO_V1 among them) name the conv plainly.
        for kind in ("weight", "bias"):
            old = f"{prefix}conv.{kind}"
            if old in state_dict:
                state_dict[f"{prefix}conv.0.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in features:
            hidden = self.conv(feature)
            logits.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return logits, deltas


def _flatten_by_anchor(level: Tensor, values_per_anchor: int) -> Tensor:
    """[N, A*C, H, W] -> [N, H*W*A, C]: the order in which anchors are tiled."""
    n, _, h, w = level.shape
    return level.view(n, -1, values_per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, values_per_anchor)


class RegionProposalNetwork(nn.Module):
    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
    ):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = pre_nms_top_n
        self._post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size

    @classmethod
    def from_config(cls, config: MaskRCNNConfig, in_channels: int) -> RegionProposalNetwork:
        anchor_generator = AnchorGenerator(config.anchor_sizes, config.aspect_ratios)
        return cls(
            anchor_generator,
            RPNHead(in_channels, anchor_generator.num_anchors_per_location, config.rpn_head_convs),
            fg_iou_thresh=config.rpn_fg_iou_thresh,
            bg_iou_thresh=config.rpn_bg_iou_thresh,
            batch_size_per_image=config.rpn_batch_size_per_image,
            positive_fraction=config.rpn_positive_fraction,
            pre_nms_top_n={"training": config.rpn_pre_nms_top_n_train, "testing": config.rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": config.rpn_post_nms_top_n_train, "testing": config.rpn_post_nms_top_n_test},
            nms_thresh=config.rpn_nms_thresh,
            score_thresh=config.rpn_score_thresh,
        )

    def _mode(self) -> str:
        return "training" if self.training else "testing"

    def forward(
        self,
        features: list[Tensor],
        batch_size: tuple[int, int],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image (Tensor[P, 4], best first) and, in training, the RPN losses.

        ``batch_size`` is the padded (height, width) of the image batch; ``image_sizes`` the
        size of each image inside it.
        """
        logits_per_level, deltas_per_level = self.head(features)
        anchors_per_level = self.anchor_generator(batch_size, features)
        anchors = torch.cat(anchors_per_level)
        anchors_per_level_count = [a.shape[0] for a in anchors_per_level]
        num_images = len(image_sizes)

        objectness = torch.cat([_flatten_by_anchor(level, 1) for level in logits_per_level], dim=1).flatten(0, -2)
        deltas = torch.cat([_flatten_by_anchor(level, 4) for level in deltas_per_level], dim=1).reshape(-1, 4)
        # Every image of the batch has the same anchors (they tile the padded batch).
        batch_anchors = anchors.repeat(num_images, 1)
        proposals = self.box_coder.decode(deltas.detach(), batch_anchors).view(num_images, -1, 4)
        boxes = self.select_proposals(proposals, objectness.detach().view(num_images, -1), image_sizes, anchors_per_level_count)

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RegionProposalNetwork: targets are needed in training mode")
            labels, matched_boxes = self.label_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(torch.cat(matched_boxes), batch_anchors)
            objectness_loss, box_loss = rpn_losses(
                objectness, deltas, labels, regression_targets, self.sampler
            )
            losses = {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
        return boxes, losses

    def select_proposals(
        self, proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]], anchors_per_level: list[int]
    ) -> list[Tensor]:
        """Top-k per level, clip, drop tiny and low-scoring boxes, NMS per level, keep the best."""
        device = proposals.device
        objectness = objectness.float()  # scores in float32 under autocast too, as the box head's are
        pre_nms_top_n = self._pre_nms_top_n[self._mode()]
        post_nms_top_n = self._post_nms_top_n[self._mode()]
        top_indices, level_ids = [], []
        offset = 0
        for level, level_objectness in enumerate(objectness.split(anchors_per_level, dim=1)):
            k = min(pre_nms_top_n, level_objectness.shape[1])
            indices = level_objectness.topk(k, dim=1).indices + offset
            top_indices.append(indices)
            level_ids.append(torch.full((k,), level, dtype=torch.int64, device=device))
            offset += level_objectness.shape[1]
        top_indices = torch.cat(top_indices, dim=1)
        levels = torch.cat(level_ids)

        batch = torch.arange(len(image_sizes), device=device)[:, None]
        scores = torch.sigmoid(objectness[batch, top_indices])
        proposals = proposals[batch, top_indices]

        selected = []
        for boxes, image_scores, image_size in zip(proposals, scores, image_sizes):
            boxes = clip_boxes_to_image(boxes, image_size)
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, image_scores, image_levels = boxes[keep], image_scores[keep], levels[keep]
            keep = torch.where(image_scores >= self.score_thresh)[0]
            boxes, image_scores, image_levels = boxes[keep], image_scores[keep], image_levels[keep]
            keep = batched_nms(boxes, image_scores, image_levels, self.nms_thresh)[:post_nms_top_n]
            selected.append(boxes[keep])
        return selected

    def label_anchors(self, anchors: Tensor, targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: labels over anchors (1 object, 0 background, -1 ignored) and matched boxes."""
        labels, matched_boxes = [], []
        for target in targets:
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:
                labels.append(torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device))
                matched_boxes.append(torch.zeros_like(anchors, dtype=torch.float32))
                continue
            matches = self.matcher(box_iou(gt_boxes, anchors))
            image_labels = (matches >= 0).to(torch.float32)
            image_labels[matches == Matcher.BETWEEN] = -1.0
            labels.append(image_labels)
            matched_boxes.append(gt_boxes[matches.clamp(min=0)])
        return labels, matched_boxes
