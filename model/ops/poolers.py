"""Multi-scale RoI pooling over an FPN: each box is pooled from the level that fits its size.

The level of a box of area w*h is the FPN paper's (Lin et al. 2017, eq. 1):
``k = floor(k0 + log2(sqrt(w*h) / 224))``, clamped to the levels present, with ``k0 = 4``
(a 224-pixel box, ImageNet's size, maps to P4). Level scales are inferred from the feature
and image sizes as powers of two. The result matches ``torchvision.ops.MultiScaleRoIAlign``.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskray.model.ops._checks import output_pair, rois_from_boxes
from maskray.model.ops.roi_align import roi_align
from maskray.model.ops.roi_pool import roi_pool


def infer_scale(feature: Tensor, image_size: Sequence[int]) -> float:
    """The power of two nearest to feature height / image height (e.g. 1/4 for P2)."""
    return 2.0 ** round(math.log2(feature.shape[-2] / image_size[0]))


def fpn_levels(boxes: Sequence[Tensor], k_min: int, k_max: int, canonical_scale: float, canonical_level: int) -> Tensor:
    """Index into [k_min, k_max] of the FPN level each box (concatenated over images) is pooled from."""
    sizes = torch.sqrt(torch.cat([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes]))
    # The epsilon keeps a box exactly at a level boundary (e.g. 224 px) from being floored down by rounding.
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_scale) + torch.tensor(1e-6, dtype=sizes.dtype))
    return levels.clamp(min=k_min, max=k_max).to(torch.int64) - k_min


def multiscale_pool(
    features: dict[str, Tensor],
    boxes: list[Tensor],
    image_shapes: list[tuple[int, int]],
    pooler: str,
    op: str,
    featmap_names: list[str],
    output_size: tuple[int, int],
    canonical_scale: float,
    canonical_level: int,
    pool_arguments: dict,
) -> Tensor:
    """The work of the module named ``pooler``, with ``op`` ("roi_align" or "roi_pool"); see its forward."""
    missing = [name for name in featmap_names if name not in features]
    if missing:
        raise KeyError(f"{pooler}: feature maps {missing} are missing; got {list(features)}")
    levels = [v for k, v in features.items() if k in featmap_names]
    image_size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
    scales = [infer_scale(level, image_size) for level in levels]
    pool = {"roi_align": roi_align, "roi_pool": roi_pool}[op]

    rois = rois_from_boxes(boxes, levels[0], pooler)
    if len(levels) == 1:
        return pool(levels[0], rois, output_size, scales[0], **pool_arguments)

    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    box_levels = fpn_levels(boxes, k_min, k_max, canonical_scale, canonical_level)
    first = levels[0]
    result = first.new_zeros((rois.size(0), first.size(1), *output_size))
    for level, (feature, scale) in enumerate(zip(levels, scales)):
        in_level = torch.where(box_levels == level)[0]
        result[in_level] = pool(feature, rois[in_level], output_size, scale, **pool_arguments).to(result.dtype)
    return result


# An FX leaf, as torchvision wraps its MultiScaleRoIAlign's data-dependent parts: level scales
# come from feature shapes and boxes are sorted into levels by value, neither of which a
# symbolic trace can follow.
torch.fx.wrap("multiscale_pool")


class _MultiScaleRoIPooler(nn.Module):
    """Shared by MultiScaleRoIAlign and MultiScaleRoIPool: level assignment and the per-level loop."""

    op = ""  # the per-level op, a key of multiscale_pool's table

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int | tuple[int, int],
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        if isinstance(featmap_names, str) or not featmap_names:
            raise ValueError(f"featmap_names must be a non-empty list of feature names, got {featmap_names!r}")
        self.featmap_names = list(featmap_names)
        self.output_size = output_pair(output_size, type(self).__name__)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def _pool_arguments(self) -> dict:
        """The pooling op's keyword arguments beyond output_size and spatial_scale."""
        return {}

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pools ``boxes`` (one Tensor[L, 4] per image, xyxy in image pixels) from ``features``.

        Args:
            features: FPN levels by name, finest first; only ``featmap_names`` are used.
            boxes: per image of the batch.
            image_shapes: (height, width) of each image as it entered the backbone.

        Returns:
            Tensor[sum(L), C, output_size[0], output_size[1]], in the order of ``boxes``.
        """
        return multiscale_pool(
            features, boxes, image_shapes, type(self).__name__, self.op, self.featmap_names, self.output_size,
            self.canonical_scale, self.canonical_level, self._pool_arguments(),
        )

    def extra_repr(self) -> str:
        return f"featmap_names={self.featmap_names}, output_size={self.output_size}"


class MultiScaleRoIAlign(_MultiScaleRoIPooler):
    """RoIAlign over FPN levels; the Mask R-CNN box and mask heads' pooler.

    Same arguments and result as ``torchvision.ops.MultiScaleRoIAlign``, plus ``aligned``
    (see :func:`model.ops.roi_align`; False, torchvision's choice, by default).
    """

    op = "roi_align"

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int | tuple[int, int],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        aligned: bool = False,
    ):
        super().__init__(featmap_names, output_size, canonical_scale=canonical_scale, canonical_level=canonical_level)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def _pool_arguments(self) -> dict:
        return {"sampling_ratio": self.sampling_ratio, "aligned": self.aligned}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"


class MultiScaleRoIPool(_MultiScaleRoIPooler):
    """RoIPool over FPN levels, for comparing against RoIAlign as the Mask R-CNN paper does."""

    op = "roi_pool"
