"""Mask R-CNN (He et al. 2017): the paper's figure as code.

    images -> transform -> backbone (ResNet-FPN) -> RPN proposals -> RoI heads -> postprocess

In training, ``model(images, targets)`` returns the losses; at inference, ``model(images)``
returns per image the boxes, labels, scores, and masks as COCO RLE, encoded straight from each
mask's box without a full-image dense mask.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from maskray.model import precision
from maskray.model.backbone import build_backbone
from maskray.model.config import MaskRCNNConfig
from maskray.model.postprocess import paste_masks_to_rle
from maskray.model.roi_heads import RoIHeads
from maskray.model.rpn import RegionProposalNetwork
from maskray.model.transform import ImageTransform, check_images, resize_boxes

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def check_targets(targets: object, images: list[Tensor], with_masks: bool, num_classes: int) -> list[dict[str, Tensor]]:
    """Targets for training, one dict per image, or a ValueError that says which is wrong."""
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        raise ValueError(f"targets must be a list of {len(images)} dicts, one per image, got {type(targets).__name__}")
    for i, (target, image) in enumerate(zip(targets, images)):
        needed = ("boxes", "labels", "masks") if with_masks else ("boxes", "labels")
        missing = [k for k in needed if k not in target]
        if missing:
            raise ValueError(f"targets[{i}] lacks {missing}")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be a float Tensor[N, 4], got {boxes.dtype} {tuple(boxes.shape)}")
        if labels.shape != (boxes.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(f"targets[{i}]['labels'] must be an int64 Tensor[{boxes.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"targets[{i}]['boxes'] has NaN or infinite coordinates")
        outside = torch.where((labels < 1) | (labels >= num_classes))[0]
        if outside.numel() > 0:
            j = int(outside[0])
            raise ValueError(
                f"targets[{i}]['labels'][{j}] = {int(labels[j])} is not a class: labels are 1..{num_classes - 1} (0 is background)"
            )
        degenerate = torch.where((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0]
        if degenerate.numel() > 0:
            j = int(degenerate[0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no width or height")
        if with_masks:
            masks = target["masks"]
            expected = (boxes.shape[0], image.shape[-2], image.shape[-1])
            if tuple(masks.shape) != expected:
                raise ValueError(f"targets[{i}]['masks'] must have shape {expected} (N x H x W), got {tuple(masks.shape)}")
    return list(targets)


class MaskRCNN(nn.Module):
    """Mask R-CNN built from a :class:`MaskRCNNConfig`; with ``config.mask=False``, Faster R-CNN."""

    def __init__(self, config: MaskRCNNConfig | None = None):
        super().__init__()
        self.config = config if config is not None else MaskRCNNConfig.resnet50_fpn()
        self.transform = ImageTransform.from_config(self.config)
        self.backbone = build_backbone(self.config)
        self.rpn = RegionProposalNetwork.from_config(self.config, self.backbone.out_channels)
        self.roi_heads = RoIHeads.from_config(self.config, self.backbone.out_channels)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Any]]:
        """Training: the dict of losses. Inference: per image a dict of ``boxes`` (xyxy pixels of
        the original image), ``labels``, ``scores``, and with the mask head ``masks`` (COCO RLE
        dicts) and ``areas`` (mask pixels; box areas without the mask head)."""
        images = check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode (call model.eval() for inference)")
            targets = check_targets(targets, images, self.roi_heads.has_mask, self.config.num_classes)
            return self.losses(images, targets)
        # Inference outputs are boxes and RLE strings: no autograd, and no autograd bookkeeping.
        with torch.inference_mode(), self._autocast(images[0].device):
            return self.detect(images)

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch, sizes, targets = self.transform(images, targets)
        features = self.backbone(batch)
        proposals, rpn_losses = self.rpn(list(features.values()), tuple(batch.shape[-2:]), sizes, targets)
        _, head_losses = self.roi_heads(features, proposals, sizes, targets)
        return {**head_losses, **rpn_losses}

    def detect(self, images: list[Tensor]) -> list[dict[str, Any]]:
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, sizes, _ = self.transform(images)
        if self.config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self.backbone(batch)
        proposals, _ = self.rpn(list(features.values()), tuple(batch.shape[-2:]), sizes)
        detections, _ = self.roi_heads(features, proposals, sizes)
        return [self._to_original(d, size, original) for d, size, original in zip(detections, sizes, original_sizes)]

    def _to_original(self, detection: dict[str, Tensor], size: tuple[int, int], original: tuple[int, int]) -> dict[str, Any]:
        boxes = resize_boxes(detection["boxes"], size, original)
        result: dict[str, Any] = {"boxes": boxes, "labels": detection["labels"], "scores": detection["scores"]}
        if "mask_probs" in detection:
            result["masks"], result["areas"] = paste_masks_to_rle(
                detection["mask_probs"], boxes, original, self.config.mask_threshold
            )
        else:
            result["areas"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return result

    def precision_on(self, device: torch.device | str) -> str:
        """The precision inference runs in on ``device`` (``fp32``, ``bf16`` or ``fp16``): ``config.precision``
        resolved there (maskray.model.precision)."""
        return precision.resolve(self.config.precision, device, self.config.cuda_autocast)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return precision.autocast(self.precision_on(device), device)

    def to_inference_layout(self) -> MaskRCNN:
        """Convolution weights in the layout ``config.channels_last`` asks for; returns self."""
        if self.config.channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    # weights -----------------------------------------------------------------------------

    @classmethod
    def from_torchvision(
        cls, state_dict_or_path: dict[str, Tensor] | str | Path | BinaryIO, config: MaskRCNNConfig | None = None
    ) -> MaskRCNN:
        """A model holding the weights of torchvision's ``maskrcnn_resnet50_fpn`` or ``_v2``.

        Takes a state dict or a file of one (the public COCO_V1 checkpoint, or
        ``torch.save(model.state_dict())`` of any torchvision Mask R-CNN or Faster R-CNN
        ResNet-50-FPN, v1 or v2); the architecture (v1 or v2, with a mask head or not) and the
        number of classes are read from the weights. COCO's class names are used when there are
        91 classes. A ``config`` that builds other parts than the weights hold is a ValueError.
        Loaded with ``weights_only=True``.
        """
        from maskray.model.checkpoint import check_layout, read_torchvision_state_dict, torchvision_config

        state_dict = read_torchvision_state_dict(state_dict_or_path)
        if config is None:
            config = torchvision_config(state_dict)
        check_layout(config, state_dict, state_dict_or_path if not isinstance(state_dict_or_path, dict) else "state dict")
        model = cls(config)
        model.load_state_dict(state_dict)
        return model.eval().to_inference_layout()

    def save(self, path: str | Path | BinaryIO, weights_dtype: str = "float32", **extra: Any) -> None:
        """One file with config, class names, weights and versions (see maskray.model.checkpoint);
        ``weights_dtype="float16"`` halves the file (loading casts back to float32)."""
        from maskray.model.checkpoint import save_checkpoint

        save_checkpoint(self, path, weights_dtype=weights_dtype, **extra)

    @classmethod
    def load(cls, path: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> MaskRCNN:
        """A model from :meth:`save`'s file, in eval mode; read with ``weights_only=True``."""
        from maskray.model.checkpoint import model_from_state, safe_load

        return model_from_state(safe_load(path, map_location), path)

