"""The box parameterisation of R-CNN (Girshick et al. 2014, appendix C).

A box is regressed from a reference box (an anchor or a proposal) as four deltas: centre
shifts in units of the reference's size and log-scale size ratios, each multiplied by a
weight that evens out their variances, (1, 1, 1, 1) in the RPN and (10, 10, 5, 5) in the box
head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    """Encodes boxes as deltas from reference boxes and decodes them back."""

    def __init__(self, weights: tuple[float, float, float, float], size_clip: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        # exp() of a large predicted size delta overflows; clip it to a 1000/16 scale change.
        self.size_clip = size_clip

    def encode(self, boxes: Tensor, references: Tensor) -> Tensor:
        """Deltas Tensor[N, 4] that turn ``references`` [N, 4] into ``boxes`` [N, 4]."""
        boxes, references = _at_least_float32(boxes), _at_least_float32(references)
        wx, wy, ww, wh = (torch.tensor(w, dtype=boxes.dtype, device=boxes.device) for w in self.weights)
        ref_w = references[:, 2:3] - references[:, 0:1]
        ref_h = references[:, 3:4] - references[:, 1:2]
        ref_x = references[:, 0:1] + 0.5 * ref_w
        ref_y = references[:, 1:2] + 0.5 * ref_h
        box_w = boxes[:, 2:3] - boxes[:, 0:1]
        box_h = boxes[:, 3:4] - boxes[:, 1:2]
        box_x = boxes[:, 0:1] + 0.5 * box_w
        box_y = boxes[:, 1:2] + 0.5 * box_h
        dx = wx * (box_x - ref_x) / ref_w
        dy = wy * (box_y - ref_y) / ref_h
        dw = ww * torch.log(box_w / ref_w)
        dh = wh * torch.log(box_h / ref_h)
        return torch.cat((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """Boxes from ``deltas`` [N, 4k] applied to ``references`` [N, 4]; returns [N, k, 4]."""
        # Under autocast the deltas may be float16, whose spacing at 1000 px is half a pixel.
        deltas = _at_least_float32(deltas)
        references = references.to(deltas.dtype)
        ref_w = references[:, 2] - references[:, 0]
        ref_h = references[:, 3] - references[:, 1]
        ref_x = references[:, 0] + 0.5 * ref_w
        ref_y = references[:, 1] + 0.5 * ref_h

        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.size_clip)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.size_clip)

        centre_x = dx * ref_w[:, None] + ref_x[:, None]
        centre_y = dy * ref_h[:, None] + ref_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * ref_w[:, None])
        half_h = 0.5 * (torch.exp(dh) * ref_h[:, None])
        return torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=2)


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
