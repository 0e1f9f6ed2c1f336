"""The box head (Fast R-CNN): two fully connected layers over each pooled RoI, then the
predictor of class logits and per-class box deltas."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BoxHead(nn.Module):
    """flatten -> fc6 -> ReLU -> fc7 -> ReLU (torchvision's TwoMLPHead, same names)."""

    def __init__(self, in_features: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, pooled: Tensor) -> Tensor:
        # flatten() follows the logical (C, H, W) order whatever the memory format, which is
        # the order fc6's weights were trained in.
        x = F.relu(self.fc6(pooled.flatten(start_dim=1)))
        return F.relu(self.fc7(x))


class BoxPredictor(nn.Module):
    """Class logits [N, K] and box deltas [N, 4K], one box per class."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)
