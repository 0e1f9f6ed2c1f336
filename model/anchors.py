"""Anchors: reference boxes tiled over every FPN level (Faster R-CNN section 3.1).

Each level has one anchor size (32 px on P2 up to 512 px on P6) at several aspect ratios,
centred on every feature-map cell. The order is cell-major then aspect ratio, which is the
order in which the RPN head's outputs are flattened.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    def __init__(self, sizes: tuple[int, ...], aspect_ratios: tuple[float, ...]):
        super().__init__()
        self.sizes = tuple(sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def cell_anchors(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Anchors of one level centred on (0, 0), rounded to whole pixels: Tensor[A, 4]."""
        ratios = torch.as_tensor(self.aspect_ratios, dtype=dtype, device=device)
        scale = torch.as_tensor([size], dtype=dtype, device=device)
        # ratio = height / width with the area kept at size**2
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        widths = (w_ratios[:, None] * scale[None, :]).view(-1)
        heights = (h_ratios[:, None] * scale[None, :]).view(-1)
        return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()

    def grid_anchors(self, image_size: tuple[int, int], grid_sizes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Per level, Tensor[H*W*A, 4] of anchors over an image batch of ``image_size``."""
        # Anchors made under inference_mode are inference tensors, which autograd must not see.
        key = (tuple(image_size), tuple(grid_sizes), dtype, device, torch.is_inference_mode_enabled())
        if key not in self._cache:
            levels = []
            for size, (grid_h, grid_w) in zip(self.sizes, grid_sizes):
                stride_h, stride_w = image_size[0] // grid_h, image_size[1] // grid_w
                shifts_x = torch.arange(grid_w, dtype=torch.int32, device=device) * stride_w
                shifts_y = torch.arange(grid_h, dtype=torch.int32, device=device) * stride_h
                shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
                shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
                shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
                base = self.cell_anchors(size, dtype, device)
                levels.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
            # Batches of one padded size repeat; a small cache spares re-tiling them.
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = levels
        return self._cache[key]

    def forward(self, image_size: tuple[int, int], features: list[Tensor]) -> list[Tensor]:
        """Anchors of every level, per level (shared by all images of the batch)."""
        if len(features) != len(self.sizes):
            raise ValueError(f"AnchorGenerator: {len(features)} feature maps but {len(self.sizes)} anchor sizes")
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        return self.grid_anchors(image_size, grid_sizes, features[0].dtype, features[0].device)
