"""torchvision's Mask R-CNN as the oracle of ours: the same weights in both, well conditioned.

A randomly initialised ResNet-50 makes activations in the hundreds, and then float rounding
decides which of thousands of near-tied boxes survive; a comparison of two implementations
would measure chaos. So the reference weights are a seeded random init whose frozen BatchNorm
statistics are calibrated on an image (every layer then sees unit-variance inputs, as in a
trained network), with the classifier's weights scaled so that scores spread over [0, 1].
Used by the parity tests and by bench/model.py.
"""

from __future__ import annotations

import torch
import torchvision
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchvisionMaskRCNN
from torchvision.ops.misc import FrozenBatchNorm2d


def torchvision_model(num_classes: int = 91, mask: bool = True, **kwargs) -> torch.nn.Module:
    """``maskrcnn_resnet50_fpn`` as torchvision builds it for trained weights (frozen BatchNorm,
    three trainable stages), randomly initialised; ``kwargs`` go to its constructor."""
    backbone = _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)
    cls = TorchvisionMaskRCNN if mask else FasterRCNN
    return cls(backbone, num_classes=num_classes, **kwargs)


def calibrated_state_dict(seed: int = 0, num_classes: int = 91, classifier_scale: float = 3.0) -> dict[str, torch.Tensor]:
    """The reference weights: seeded init, BatchNorm statistics calibrated, classifier scaled."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = torchvision_model(num_classes, min_size=320, max_size=512).eval()
        image = torch.rand(3, 240, 320)
    finally:
        torch.random.set_rng_state(generator_state)

    def calibrate(layer: FrozenBatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        layer.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        layer.running_var.copy_(inputs[0].var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model.backbone(model.transform([image])[0].tensors)
        model.roi_heads.box_predictor.cls_score.weight.mul_(classifier_scale)
    for hook in hooks:
        hook.remove()
    return model.state_dict()


def torchvision_model_v2(num_classes: int = 91, mask: bool = True, **kwargs) -> torch.nn.Module:
    """torchvision's own ``maskrcnn_resnet50_fpn_v2`` (``mask=False``: ``fasterrcnn_resnet50_fpn_v2``),
    randomly initialised; ``kwargs`` go to its constructor. Built without weights, torchvision
    makes all five stages trainable: that changes which gradients exist, not what it computes."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2

    build = maskrcnn_resnet50_fpn_v2 if mask else fasterrcnn_resnet50_fpn_v2
    return build(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def calibrated_state_dict_v2(seed: int = 0, num_classes: int = 91, mask: bool = True,
                             classifier_scale: float = 3.0) -> dict[str, torch.Tensor]:
    """v2's reference weights, made as v1's: seeded init, every BatchNorm's statistics (trunk,
    FPN, box head, mask head) calibrated on what reaches it from one image, classifier scaled."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = torchvision_model_v2(num_classes, mask, min_size=320, max_size=512).eval()
        image = torch.rand(3, 240, 320)
    finally:
        torch.random.set_rng_state(generator_state)

    def calibrate(layer: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        if inputs[0].shape[0] > 0:  # the mask head sees no RoIs when nothing is detected
            layer.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
            layer.running_var.copy_(inputs[0].var(dim=(0, 2, 3)))

    # The heads' statistics come from a full forward: the RoIs are what the RPN proposes.
    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(classifier_scale)
        model.roi_heads.score_thresh = 0.0  # RoIs for the mask head's statistics, whatever the scores
        model([image])
    for hook in hooks:
        hook.remove()
    return model.state_dict()
