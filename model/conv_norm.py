"""A convolution with an optional BatchNorm and ReLU after it, laid out as torchvision's
``Conv2dNormActivation`` (key ``0`` the conv, ``1`` the norm), for the parts that v2 normalises.

torchvision's ``*_resnet50_fpn_v2`` put BatchNorm after the convs of the FPN, the box head and the
mask head (Li et al. 2021, "Benchmarking Detection Transfer Learning with Vision Transformers").
With a norm the conv has no bias: the norm's shift is one. In eval mode a BatchNorm is an affine
map per channel, so at inference it is folded into the conv, as in the ResNet trunk (``conv_bn``).
"""

from __future__ import annotations

from torch import Tensor, nn

from maskray.model.config import CONV_NORMS
from maskray.model.resnet import BatchNorm2d, conv_bn


class ConvNormActivation(nn.Sequential):
    """``kernel`` x ``kernel`` conv (stride 1, same padding), BatchNorm if ``norm="batch"``, ReLU if ``relu``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, norm: str = "none", relu: bool = True,
                 fold_batchnorm: bool = True):
        if norm not in CONV_NORMS:
            raise ValueError(f"unknown norm {norm!r}; one of {CONV_NORMS}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=norm == "none")]
        if norm == "batch":
            bn = BatchNorm2d(out_channels)
            bn.fold_at_inference = fold_batchnorm
            layers.append(bn)
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.normalised = norm == "batch"
        self.activated = relu

    def forward(self, x: Tensor) -> Tensor:
        x = conv_bn(x, self[0], self[1]) if self.normalised else self[0](x)
        return self[-1](x) if self.activated else x
