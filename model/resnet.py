"""ResNet trunks (He et al. 2016) with frozen BatchNorm, laid out as torchvision's.

Module names match torchvision's ``resnet*`` (``layer1.0.conv1.weight``, ``layer1.0.bn1.running_var``,
``layer1.0.downsample.0.weight``...), so ImageNet and COCO checkpoints load unchanged; the
stride of a Bottleneck is on its 3x3 conv ("ResNet v1.5"), as there.

What is ours: every conv + frozen BatchNorm pair runs, at inference, as one conv whose weights
and bias have the BatchNorm folded in. A frozen BatchNorm is an affine map per channel, so
``bn(conv(x)) == conv'(x)``; folding saves a pass over every activation (a fifth of the
backbone's time on a CPU). The folded weights are cached and recomputed whenever the conv's or
the BatchNorm's tensors change, so the state dict stays torchvision's.

Frozen BatchNorm suits weights trained elsewhere (ImageNet, COCO). A trunk trained from scratch
has no statistics to freeze: with ``norm="batch"`` its BatchNorm layers learn (batch statistics
in training, running averages kept), and in eval mode each one is again an affine map per
channel, folded into its conv exactly like a frozen one. Same keys, same inference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYOUTS = {
    # name: (block, blocks per stage)
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


class _Foldable:
    """The fold cache of a BatchNorm that is an affine map at inference (see conv_bn)."""

    fold_at_inference: bool
    _folded: tuple[tuple, Tensor, Tensor] | None

    def folded_into(self, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the conv that equals ``self(conv(x))``, cached until a tensor changes
        (in place, by an optimiser or ``load_state_dict``) or the module's mode is set."""
        tensors = (conv.weight, self.weight, self.bias, self.running_mean, self.running_var)
        # _version counts in-place writes (optimiser steps, load_state_dict); data_ptr catches .to().
        key = tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                scale, shift = self.scale_and_shift()
                weight = conv.weight * scale.reshape(-1, 1, 1, 1)
                bias = shift if conv.bias is None else conv.bias * scale + shift
            self._folded = (key, weight, bias)
        return self._folded[1], self._folded[2]


class FrozenBatchNorm2d(_Foldable, nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers.

    Detection batches are too small for batch statistics, so the ImageNet statistics are kept
    (the Mask R-CNN paper, section 3.1). Buffers, not parameters: the optimiser never sees them.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # Whether conv_bn folds this layer into its conv at inference (MaskRCNNConfig.fold_batchnorm).
        self.fold_at_inference = True
        self._folded: tuple[tuple, Tensor, Tensor] | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A trainable BatchNorm's state dict counts its batches; frozen statistics have no use for it.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The affine map this layer is: ``x * scale + shift``, per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        # Writes through .data bypass the version counters the cache checks; a mode switch
        # (model.eval() after loading or editing weights) always starts afresh.
        self._folded = None
        return super().train(mode)

    @property
    def batch_statistics(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BatchNorm2d(_Foldable, nn.BatchNorm2d):
    """Trainable BatchNorm for a trunk trained from scratch (``MaskRCNNConfig.backbone_norm="batch"``).

    Training mode normalises with the batch's statistics and keeps running averages; eval
    mode is the affine map of those averages, folded into the conv like FrozenBatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)
        self.fold_at_inference = True
        self._folded = None

    @property
    def batch_statistics(self) -> bool:
        return self.training

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def train(self, mode: bool = True) -> BatchNorm2d:
        self._folded = None
        return super().train(mode)


NORMS = {"frozen": FrozenBatchNorm2d, "batch": BatchNorm2d}


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d | BatchNorm2d) -> Tensor:
    """``bn(conv(x))``; one folded conv when no gradient is wanted (inference)."""
    if torch.is_grad_enabled() or not bn.fold_at_inference or bn.batch_statistics:
        return bn(conv(x))
    weight, bias = bn.folded_into(conv)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)


class Downsample(nn.Sequential):
    """The projection shortcut: 1x1 conv (strided) + frozen BatchNorm (keys downsample.0/.1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: type[nn.Module] = FrozenBatchNorm2d):
        super().__init__(_conv(in_channels, out_channels, 1, stride), norm(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn(x, self[0], self[1])


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, norm: type[nn.Module] = FrozenBatchNorm2d):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 3, stride)
        self.bn1 = norm(planes)
        self.conv2 = _conv(planes, out_channels, 3)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = Downsample(in_channels, out_channels, stride, norm) if stride != 1 or in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = conv_bn(out, self.conv2, self.bn2)
        out += shortcut
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, and a shortcut (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, norm: type[nn.Module] = FrozenBatchNorm2d):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 1)
        self.bn1 = norm(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = norm(planes)
        self.conv3 = _conv(planes, out_channels, 1)
        self.bn3 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = Downsample(in_channels, out_channels, stride, norm) if stride != 1 or in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = self.relu(conv_bn(out, self.conv2, self.bn2))
        out = conv_bn(out, self.conv3, self.bn3)
        out += shortcut
        return self.relu(out)


class ResNet(nn.Module):
    """The stem (7x7/2 conv, 3x3/2 max pool) and four stages; returns C2..C5 as '0'..'3'."""

    def __init__(self, name: str, fold_batchnorm: bool = True, norm: str = "frozen"):
        super().__init__()
        if name not in LAYOUTS:
            raise ValueError(f"unknown ResNet {name!r}; one of {sorted(LAYOUTS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; one of {sorted(NORMS)}")
        norm_layer = NORMS[norm]
        kind, depths = LAYOUTS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
            blocks = []
            for i in range(depth):
                blocks.append(block(in_channels, planes, stride=2 if stage > 1 and i == 0 else 1, norm=norm_layer))
                in_channels = planes * block.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.stage_channels = [planes * block.expansion for planes in (64, 128, 256, 512)]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (FrozenBatchNorm2d, BatchNorm2d)):
                module.fold_at_inference = fold_batchnorm

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(conv_bn(x, self.conv1, self.bn1)))
        stages = {}
        for name in ("0", "1", "2", "3"):
            x = getattr(self, f"layer{int(name) + 1}")(x)
            stages[name] = x
        return stages
