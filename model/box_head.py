"""The box head (Fast R-CNN): two fully connected layers over each pooled RoI, then the
predictor of class logits and per-class box deltas.

v2 (torchvision's ``*_resnet50_fpn_v2``, Detectron's "4conv1fc" head with BatchNorm) replaces
the two fully connected layers by four 3x3 convs with BatchNorm over the 7x7 RoI feature and
one fully connected layer (``box_head_convs=4``, ``head_norm="batch"``); the predictor is v1's."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from maskray.model.conv_norm import ConvNormActivation


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


class ConvFCBoxHead(nn.Sequential):
    """``convs`` x (3x3 conv [+ BatchNorm] + ReLU) -> flatten -> fc -> ReLU (torchvision's
    FastRCNNConvFCHead with one fully connected layer, same keys: 0.0.weight .. 3.1.weight, 5.weight)."""

    def __init__(self, in_channels: int, pool_size: int, convs: int, channels: int, representation_size: int,
                 norm: str = "batch", fold_batchnorm: bool = True):
        blocks: list[nn.Module] = [
            ConvNormActivation(in_channels if i == 0 else channels, channels, 3, norm, fold_batchnorm=fold_batchnorm)
            for i in range(convs)
        ]
        # nn.Flatten follows the logical (C, H, W) order whatever the memory format, as fc6 does.
        blocks += [nn.Flatten(), nn.Linear(channels * pool_size**2, representation_size), nn.ReLU(inplace=True)]
        super().__init__(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def out_features(self) -> int:
        return self[-2].out_features


class BoxPredictor(nn.Module):
    """Class logits [N, K] and box deltas [N, 4K], one box per class."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)
