"""The image transform: normalise, resize, batch with padding; and the way back.

Each image is scaled so that its short side is ``min_size`` unless its long side would then
pass ``max_size`` (the paper's 800/1333), normalised with the ImageNet mean and std, and padded
into one batch whose sides are multiples of 32 (so every FPN level's grid divides evenly).
Ground-truth boxes and masks are scaled with their image in training; predicted boxes are
mapped back to each original image at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskray.model.config import MaskRCNNConfig


def check_images(images: object) -> list[Tensor]:
    """A list of 3xHxW uint8 or floating tensors, or a ValueError that says which is wrong."""
    if isinstance(images, Tensor) or not isinstance(images, (list, tuple)):
        raise ValueError(
            f"images must be a list of 3xHxW tensors (uint8, or float in [0, 1]), got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("images is an empty list")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"images[{i}] must be a Tensor, got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{i}] must have shape 3xHxW, got {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise ValueError(f"images[{i}] must be uint8 or floating point, got {image.dtype}")
        if image.device != images[0].device:
            raise ValueError(f"images[{i}] is on {image.device} but images[0] is on {images[0].device}")
    return list(images)


def resize_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Scales xyxy boxes from an image of ``from_size`` (h, w) to one of ``to_size``."""
    ratio_h, ratio_w = (
        torch.tensor(t, dtype=torch.float32, device=boxes.device) / torch.tensor(f, dtype=torch.float32, device=boxes.device)
        for t, f in zip(to_size, from_size)
    )
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


class ImageTransform(nn.Module):
    def __init__(
        self,
        min_size: tuple[int, ...],
        max_size: int,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
        size_divisible: int = 32,
    ):
        super().__init__()
        self.min_size = tuple(min_size)
        self.max_size = max_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.size_divisible = size_divisible

    @classmethod
    def from_config(cls, config: MaskRCNNConfig) -> ImageTransform:
        return cls(config.min_size, config.max_size, config.image_mean, config.image_std, config.size_divisible)

    def normalize(self, image: Tensor, dtype: torch.dtype) -> Tensor:
        # uint8 is 0-255; float images of any precision are taken as [0, 1] in the model's dtype.
        image = image.to(dtype) / 255 if image.dtype == torch.uint8 else image.to(dtype)
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def choose_min_size(self) -> int:
        if not self.training:
            return self.min_size[-1]
        # Multi-scale training: one of min_size per image, drawn from torch's generator so that
        # torch.manual_seed makes runs repeatable.
        return self.min_size[int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())]

    def resize(self, image: Tensor, target: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor] | None]:
        height, width = image.shape[-2:]
        min_size = self.choose_min_size()
        scale = min(min_size / min(height, width), self.max_size / max(height, width))
        # floor(side * scale), as interpolate's recompute_scale_factor computes it, but at least one
        # pixel: a strip wider than max_size:1 (20000x1) would otherwise shrink to nothing and fail.
        size = [max(1, math.floor(side * scale)) for side in (height, width)]
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, None
        target = dict(target)
        target["boxes"] = resize_boxes(target["boxes"], (height, width), tuple(image.shape[-2:]))
        if "masks" in target:
            masks = target["masks"][:, None].float()
            target["masks"] = F.interpolate(masks, size=size)[:, 0].byte()
        return image, target

    def batch(self, images: list[Tensor]) -> Tensor:
        """Zero-padded [N, 3, H, W] with H and W rounded up to ``size_divisible``."""
        step = self.size_divisible
        height = int(math.ceil(max(img.shape[-2] for img in images) / step) * step)
        width = int(math.ceil(max(img.shape[-1] for img in images) / step) * step)
        batch = images[0].new_zeros((len(images), 3, height, width))
        for slot, image in zip(batch, images):
            slot[:, : image.shape[-2], : image.shape[-1]].copy_(image)
        return batch

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """(batch, the size of each resized image inside it, resized targets)."""
        resized, sizes, resized_targets = [], [], []
        for i, image in enumerate(images):
            target = targets[i] if targets is not None else None
            image, target = self.resize(self.normalize(image, dtype), target)
            resized.append(image)
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            resized_targets.append(target)
        return self.batch(resized), sizes, (resized_targets if targets is not None else None)
