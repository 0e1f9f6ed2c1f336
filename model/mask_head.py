"""The mask head (the paper's FCN branch, figure 4 right): four 3x3 convs over the 14x14 RoI
feature, a 2x deconvolution to 28x28, and a 1x1 conv giving one mask logit map per class.

v2 (torchvision's ``maskrcnn_resnet50_fpn_v2``) puts a BatchNorm after each of the four convs
(``head_norm="batch"``), folded into its conv at inference; the predictor is v1's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskray.model.conv_norm import ConvNormActivation


class MaskHead(nn.Sequential):
    """``layers`` x (3x3 conv [+ BatchNorm] + ReLU); module names are torchvision's (0.0.weight,
    1.0.weight, ...; with BatchNorm 0.1.weight, 0.1.running_mean, ...)."""

    def __init__(self, in_channels: int, channels: int, layers: int = 4, norm: str = "none", fold_batchnorm: bool = True):
        blocks = []
        for i in range(layers):
            block = ConvNormActivation(in_channels if i == 0 else channels, channels, 3, norm, fold_batchnorm=fold_batchnorm)
            nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")
            if block[0].bias is not None:
                nn.init.zeros_(block[0].bias)
            blocks.append(block)
        super().__init__(*blocks)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints from before torchvision 0.12 (COCO_V1 among them) call the convs mask_fcn1..4.
        for i in range(len(self)):
            for kind in ("weight", "bias"):
                old = f"{prefix}mask_fcn{i + 1}.{kind}"
                if old in state_dict:
                    state_dict[f"{prefix}{i}.0.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class MaskPredictor(nn.Module):
    """2x2 stride-2 deconvolution + ReLU, then a 1x1 conv to one logit map per class."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, channels, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(channels, num_classes, 1)
        for module in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)

    def upsample(self, x: Tensor) -> Tensor:
        return F.relu(self.conv5_mask(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of every class: Tensor[N, num_classes, 2S, 2S]."""
        return self.mask_fcn_logits(self.upsample(x))

    def logits_for(self, x: Tensor, labels: Tensor) -> Tensor:
        """Logits of one class per RoI, Tensor[N, 2S, 2S], without computing the others.

        At inference only the detected class's mask is used; the 1x1 conv for that class alone
        is a dot product per pixel, K times less work than all classes.
        """
        hidden = self.upsample(x)
        weight = self.mask_fcn_logits.weight[labels, :, 0, 0]  # [N, C]
        bias = self.mask_fcn_logits.bias[labels]  # [N]
        return torch.einsum("nchw,nc->nhw", hidden, weight) + bias[:, None, None]
