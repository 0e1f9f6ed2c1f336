"""The backbone: a ResNet trunk with frozen BatchNorm, and a Feature Pyramid Network on top.

The trunk is a ResNet (maskray.model.resnet) without its classifier. The FPN (Lin et
al. 2017) turns the four stages C2..C5 into P2..P5 of one width with a top-down pathway and
lateral 1x1 connections, and adds P6 by subsampling P5 for the RPN's largest anchors.

v2 (torchvision's ``*_resnet50_fpn_v2``) trains the trunk's BatchNorm (``backbone_norm="batch"``)
and puts a BatchNorm after each FPN conv (``fpn_norm="batch"``); the convs then have no bias.

Module names follow torchvision's ``maskrcnn_resnet50_fpn`` (``backbone.body.*``,
``backbone.fpn.inner_blocks.*``, ...), so its state dicts load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from maskray.model.config import MaskRCNNConfig
from maskray.model.conv_norm import ConvNormActivation
from maskray.model.resnet import ResNet

# The order in which layers become trainable, deepest first (torchvision's and Detectron2's).
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


class FeaturePyramidNetwork(nn.Module):
    """P2..P5 from C2..C5, plus P6 ('pool') by stride-2 subsampling of P5; ``norm="batch"`` is v2's."""

    def __init__(self, in_channels: list[int], out_channels: int, norm: str = "none", fold_batchnorm: bool = True):
        super().__init__()
        # Conv (+ BatchNorm) blocks keep torchvision's key names (inner_blocks.0.0.weight, .0.1.weight).
        def block(c_in: int, kernel: int) -> ConvNormActivation:
            return ConvNormActivation(c_in, out_channels, kernel, norm, relu=False, fold_batchnorm=fold_batchnorm)

        self.inner_blocks = nn.ModuleList(block(c, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(block(out_channels, 3) for _ in in_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints of older torchvision (COCO_V1 among them) hold plain convs: inner_blocks.0.weight.
        for blocks in ("inner_blocks", "layer_blocks"):
            for i in range(len(self.inner_blocks)):
                for kind in ("weight", "bias"):
                    old = f"{prefix}{blocks}.{i}.{kind}"
                    if old in state_dict:
                        state_dict[f"{prefix}{blocks}.{i}.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, stages: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        names = list(stages)
        inputs = list(stages.values())
        top_down = self.inner_blocks[-1](inputs[-1])
        outputs = [self.layer_blocks[-1](top_down)]
        for level in range(len(inputs) - 2, -1, -1):
            lateral = self.inner_blocks[level](inputs[level])
            # Nearest upsampling to the lateral's exact size (odd sizes do not double evenly).
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.layer_blocks[level](top_down))
        # P6 for the largest anchors: a 1x1 max pool with stride 2 is plain subsampling.
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(names + ["pool"], outputs))


class BackboneWithFPN(nn.Module):
    """``body`` (ResNet) then ``fpn``; ``out_channels`` is the width of every level."""

    def __init__(self, body: ResNet, fpn: FeaturePyramidNetwork, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(images))


def build_backbone(config: MaskRCNNConfig) -> BackboneWithFPN:
    """The ResNet-FPN of ``config``: randomly initialised, its first layers' weights frozen. A
    trainable BatchNorm in a frozen layer still normalises by batch statistics in training, as in
    torchvision's v2."""
    body = ResNet(config.backbone, fold_batchnorm=config.fold_batchnorm, norm=config.backbone_norm)
    trainable = _TRAINABLE_ORDER[: config.trainable_backbone_layers]
    if config.trainable_backbone_layers == 5:
        trainable = trainable + ("bn1",)
    for name, parameter in body.named_parameters():
        if not name.startswith(trainable):
            parameter.requires_grad_(False)
    fpn = FeaturePyramidNetwork(body.stage_channels, config.fpn_channels, config.fpn_norm, config.fold_batchnorm)
    return BackboneWithFPN(body, fpn, config.fpn_channels)
