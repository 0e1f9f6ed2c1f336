"""Each part of the model against its torchvision counterpart, on the same weights and inputs.

torchvision is the oracle throughout: expected values come from torchvision's own classes and
functions (its ResNet with FrozenBatchNorm2d, FeaturePyramidNetwork, AnchorGenerator, BoxCoder,
Matcher, sampler, box ops, GeneralizedRCNNTransform, RPN, RoIHeads, losses), never from the
code under test. Small inputs and ResNet-18 where the part allows keep the file quick; the
ResNet-50 Mask R-CNN as a whole is compared in test_model_parity.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN as TVBackboneWithFPN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork as TVFeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

from maskray.model import MaskRCNNConfig
from maskray.model.anchors import AnchorGenerator
from maskray.model.backbone import FeaturePyramidNetwork, build_backbone
from maskray.model.box_coder import BoxCoder
from maskray.model.box_head import BoxHead, BoxPredictor
from maskray.model.losses import fast_rcnn_losses, mask_loss, rpn_losses
from maskray.model.mask_head import MaskPredictor
from maskray.model.matcher import Matcher
from maskray.model.resnet import FrozenBatchNorm2d, ResNet
from maskray.model.roi_heads import RoIHeads
from maskray.model.rpn import RegionProposalNetwork, RPNHead, _flatten_by_anchor
from maskray.model.sampler import BalancedSampler
from maskray.model.transform import ImageTransform, resize_boxes

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def random_boxes(n: int, height: float, width: float, generator: torch.Generator, min_side: float = 1.0) -> torch.Tensor:
    """n xyxy float boxes inside a height x width image, each side at least min_side."""
    x1 = torch.rand(n, generator=generator) * (width - min_side)
    y1 = torch.rand(n, generator=generator) * (height - min_side)
    w = min_side + torch.rand(n, generator=generator) * (width - min_side - x1)
    h = min_side + torch.rand(n, generator=generator) * (height - min_side - y1)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


# ------------------------------------------------------------------------------------------
# ResNet trunk


def torchvision_resnet(name: str, seed: int) -> nn.Module:
    """torchvision's resnet with frozen BatchNorm, seeded, its BatchNorm made non-trivial.

    The affine parameters are random and the statistics calibrated on an image (each layer
    then sees roughly unit-variance inputs, as in a trained network), so that folding the
    BatchNorm into the convs is a real change and rounding stays small.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = getattr(torchvision.models, name)(weights=None, norm_layer=TVFrozenBatchNorm2d).eval()
        layers = [m for m in net.modules() if isinstance(m, TVFrozenBatchNorm2d)]
        for layer in layers:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_(0.0, 0.2)
        image = torch.rand(4, 3, 128, 128)
    finally:
        torch.random.set_rng_state(state)

    def calibrate(layer, inputs):
        layer.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        layer.running_var.copy_(inputs[0].var(dim=(0, 2, 3)))

    hooks = [layer.register_forward_pre_hook(calibrate) for layer in layers]
    with torch.no_grad():
        net(image)
    for hook in hooks:
        hook.remove()
    return net


def trunk_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def torchvision_stages(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    stages = {}
    for i in range(4):
        x = getattr(net, f"layer{i + 1}")(x)
        stages[str(i)] = x
    return stages


def our_trunk(name: str, reference: nn.Module, fold: bool) -> ResNet:
    trunk = ResNet(name, fold_batchnorm=fold).eval()
    result = trunk.load_state_dict(trunk_state_dict(reference), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return trunk


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def resnet_pair(request):
    return request.param, torchvision_resnet(request.param, seed=1)


@pytest.fixture(scope="module")
def trunk_input():
    return torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(2))


def test_resnet_stages_equal_torchvisions_without_folding(resnet_pair, trunk_input):
    name, reference = resnet_pair
    trunk = our_trunk(name, reference, fold=False)  # a strict load: torchvision's keys and shapes
    with torch.no_grad():
        expected = torchvision_stages(reference, trunk_input)
        stages = trunk(trunk_input)
    assert list(stages) == ["0", "1", "2", "3"]
    assert trunk.stage_channels == [expected[s].shape[1] for s in "0123"]
    for key in expected:
        assert torch.equal(stages[key], expected[key]), key


def test_resnet_stages_with_folded_batchnorm_are_close(resnet_pair, trunk_input):
    """Folding is exact arithmetic: in float64 it agrees to 1e-10; in float32 it rounds differently."""
    name, reference = resnet_pair
    trunk = our_trunk(name, reference, fold=True)
    with torch.no_grad():
        expected = torchvision_stages(reference, trunk_input)
        stages = trunk(trunk_input)
    with torch.inference_mode():
        stages_inference = trunk(trunk_input)
    for key in expected:
        # Rounding compounds over the blocks (ResNet-50's last stage differs by ~1e-4 of its range).
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(stages[key], expected[key], rtol=1e-3, atol=2e-4 * scale, msg=key)
        assert torch.equal(stages_inference[key], stages[key]), key

    reference64 = copy.deepcopy(reference).double()
    trunk64 = our_trunk(name, reference64, fold=True).double()
    with torch.no_grad():
        expected = torchvision_stages(reference64, trunk_input.double())
        stages = trunk64(trunk_input.double())
    for key in expected:
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(stages[key], expected[key], rtol=1e-10, atol=1e-10 * scale, msg=key)


def test_resnet_loads_an_imagenet_style_state_dict(trunk_input):
    """A classification checkpoint (trainable BatchNorm, num_batches_tracked) loads strictly."""
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for layer in reference.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_(0, 0.2)
                layer.running_mean.normal_(0, 0.2)
                layer.running_var.uniform_(0.5, 2.0)
                layer.num_batches_tracked.fill_(100)
    state = trunk_state_dict(reference)
    assert any(k.endswith("num_batches_tracked") for k in state)
    trunk = ResNet("resnet18", fold_batchnorm=False).eval()
    trunk.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected = torchvision_stages(reference, trunk_input)
        stages = trunk(trunk_input)
    for key in expected:
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(stages[key], expected[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


def _assert_stages_close(stages, expected):
    for key in expected:
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(stages[key], expected[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-3) for k in a)


def test_folded_cache_follows_in_place_weight_changes(trunk_input):
    reference = torchvision_resnet("resnet18", seed=4)
    trunk = our_trunk("resnet18", reference, fold=True)
    with torch.no_grad():
        before = trunk(trunk_input)  # fills the cache
        # An in-place change of a conv weight, and of a BatchNorm statistic, in both models.
        for net in (trunk, reference):
            net.layer1[0].conv1.weight.mul_(2)
            net.layer2[0].downsample[1].running_var.mul_(4)
            net.conv1.weight.add_(0.01)
        after = trunk(trunk_input)
        expected = torchvision_stages(reference, trunk_input)
    assert _differs(after, before)
    _assert_stages_close(after, expected)


def test_folded_cache_follows_load_state_dict(trunk_input):
    first = torchvision_resnet("resnet18", seed=5)
    second = torchvision_resnet("resnet18", seed=6)
    trunk = our_trunk("resnet18", first, fold=True)
    with torch.inference_mode():
        _assert_stages_close(trunk(trunk_input), torchvision_stages(first, trunk_input))
    trunk.load_state_dict(trunk_state_dict(second))
    with torch.inference_mode():
        _assert_stages_close(trunk(trunk_input), torchvision_stages(second, trunk_input))
    # the folded weights cached under inference_mode also serve plain no_grad calls
    with torch.no_grad():
        _assert_stages_close(trunk(trunk_input), torchvision_stages(second, trunk_input))


def test_folded_cache_follows_dtype_change(trunk_input):
    reference = torchvision_resnet("resnet18", seed=7)
    trunk = our_trunk("resnet18", reference, fold=True)
    with torch.no_grad():
        trunk(trunk_input)
        stages = trunk.double()(trunk_input.double())
        expected = torchvision_stages(reference.double(), trunk_input.double())
    for key in expected:
        assert stages[key].dtype == torch.float64
        torch.testing.assert_close(stages[key], expected[key], rtol=1e-10, atol=1e-10 * expected[key].abs().max().item())


def test_folded_cache_follows_writes_through_data(trunk_input):
    reference = torchvision_resnet("resnet18", seed=8)
    trunk = our_trunk("resnet18", reference, fold=True)
    with torch.no_grad():
        trunk(trunk_input)
        for net in (trunk, reference):
            net.layer1[0].conv1.weight.data.mul_(2)
        # .data writes bypass the version counters; eval() (any mode switch) refolds.
        trunk.eval()
        stages = trunk(trunk_input)
        expected = torchvision_stages(reference, trunk_input)
    _assert_stages_close(stages, expected)


def test_resnet_with_gradients_uses_the_unfolded_path(trunk_input):
    """With autograd on, conv and BatchNorm run apart: torchvision's exact values and gradients."""
    reference = torchvision_resnet("resnet18", seed=9)
    trunk = our_trunk("resnet18", reference, fold=True).train()
    with torch.no_grad():
        trunk(trunk_input)  # a folded cache exists, and must not be used with gradients
    stages = trunk(trunk_input)
    expected = torchvision_stages(reference.train(), trunk_input)
    for key in expected:
        assert torch.equal(stages[key], expected[key]), key
    sum(s.square().mean() for s in stages.values()).backward()
    sum(s.square().mean() for s in expected.values()).backward()
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in trunk.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        torch.testing.assert_close(parameter.grad, reference_parameters[name].grad, msg=name)


def test_frozen_batchnorm_equals_torchvisions():
    generator = torch.Generator().manual_seed(10)
    ours, theirs = FrozenBatchNorm2d(6), TVFrozenBatchNorm2d(6)
    state = {
        "weight": torch.rand(6, generator=generator) + 0.5,
        "bias": torch.randn(6, generator=generator),
        "running_mean": torch.randn(6, generator=generator),
        "running_var": torch.rand(6, generator=generator) + 0.1,
    }
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    x = torch.randn(2, 6, 5, 7, generator=generator)
    assert torch.equal(ours(x), theirs(x))
    assert ours.eps == theirs.eps
    assert not list(ours.parameters())  # statistics and affine are buffers: no optimiser sees them


# ------------------------------------------------------------------------------------------
# FPN and the backbone


def test_fpn_equals_torchvisions():
    torch.manual_seed(11)
    in_channels = [8, 16, 24, 32]
    ours = FeaturePyramidNetwork(in_channels, 12)
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, nn.Conv2d):
                module.bias.normal_()  # the init zeroes them; the test wants them seen
    theirs = TVFeaturePyramidNetwork(in_channels, 12, extra_blocks=LastLevelMaxPool())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # Odd sizes: the top-down pathway upsamples to each lateral's exact size.
    sizes = [(25, 33), (13, 17), (7, 9), (4, 5)]
    stages = {str(i): torch.randn(2, c, h, w) for i, (c, (h, w)) in enumerate(zip(in_channels, sizes))}
    with torch.no_grad():
        mine = ours(stages)
        expected = theirs(dict(stages))
    assert list(mine) == list(expected) == ["0", "1", "2", "3", "pool"]
    for key in expected:
        assert torch.equal(mine[key], expected[key]), key


def test_fpn_init_is_torchvisions():
    """kaiming_uniform_(a=1) weights and zero biases: the same draws from the same seed."""
    torch.manual_seed(12)
    ours = FeaturePyramidNetwork([8, 16, 24, 32], 12)
    torch.manual_seed(12)
    theirs = TVFeaturePyramidNetwork([8, 16, 24, 32], 12, extra_blocks=LastLevelMaxPool())
    expected = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_backbone_equals_torchvisions_backbone_with_fpn(trunk_input):
    config = MaskRCNNConfig.light(num_classes=3, fpn_channels=32, fold_batchnorm=False)
    ours = build_backbone(config).eval()
    reference_trunk = torchvision_resnet("resnet18", seed=13)
    theirs = TVBackboneWithFPN(
        reference_trunk,
        {f"layer{i}": str(i - 1) for i in range(1, 5)},
        [64, 128, 256, 512],
        32,
        extra_blocks=LastLevelMaxPool(),
    ).eval()
    state = {k: v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    assert ours.out_channels == theirs.out_channels
    with torch.no_grad():
        mine = ours(trunk_input)
        expected = theirs(trunk_input)
    assert list(mine) == list(expected)
    for key in expected:
        assert torch.equal(mine[key], expected[key]), key


def test_trainable_backbone_layers_are_torchvisions():
    trunk = torchvision.models.resnet18(weights=None, norm_layer=TVFrozenBatchNorm2d)
    seen = set()
    for trainable in range(6):
        ours = build_backbone(MaskRCNNConfig.light(num_classes=3, trainable_backbone_layers=trainable))
        trunk.requires_grad_(True)
        theirs = _resnet_fpn_extractor(trunk, trainable)
        mine = frozenset(n for n, p in ours.body.named_parameters() if p.requires_grad)
        expected = frozenset(n for n, p in theirs.body.named_parameters() if p.requires_grad)
        assert mine == expected, trainable
        assert all(p.requires_grad for p in ours.fpn.parameters())
        seen.add(mine)
    assert len(seen) == 6  # each setting frees one more stage


# ------------------------------------------------------------------------------------------
# Anchors


ANCHOR_CASES = [
    # (sizes, aspect ratios, padded image size, grid sizes)
    ((32, 64, 128, 256, 512), (0.5, 1.0, 2.0), (800, 1216), None),
    ((16, 32, 64, 128, 256), (0.5, 1.0, 2.0), (320, 512), None),
    ((32, 64, 128, 256, 512), (0.25, 0.5, 1.0, 2.0, 4.0), (224, 96), None),
    # grids that do not divide the image evenly (strides are floor divisions in both)
    ((32, 64, 128, 256, 512), (0.5, 1.0, 2.0), (100, 150), [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)]),
]


@pytest.mark.parametrize("sizes, ratios, image_size, grids", ANCHOR_CASES)
def test_anchors_equal_torchvisions(sizes, ratios, image_size, grids):
    if grids is None:
        grids = [(math.ceil(image_size[0] / s), math.ceil(image_size[1] / s)) for s in (4, 8, 16, 32, 64)]
    features = [torch.zeros(1, 2, h, w) for h, w in grids]
    ours = AnchorGenerator(sizes, ratios)
    theirs = TVAnchorGenerator(tuple((s,) for s in sizes), (tuple(ratios),) * len(sizes))
    images = ImageList(torch.zeros(2, 3, *image_size), [image_size, image_size])
    expected = theirs(images, features)
    mine = ours(image_size, features)
    assert ours.num_anchors_per_location == theirs.num_anchors_per_location()[0]
    assert [m.shape[0] for m in mine] == [h * w * len(ratios) for h, w in grids]
    assert torch.equal(torch.cat(mine), expected[0])
    # the cache hands back the same anchors
    assert torch.equal(torch.cat(ours(image_size, features)), expected[0])


def test_anchors_made_for_inference_are_not_reused_with_autograd():
    generator = AnchorGenerator((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    features = [torch.zeros(1, 2, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    with torch.inference_mode():
        for_inference = generator((64, 64), features)
    for_training = generator((64, 64), features)
    assert all(a.is_inference() for a in for_inference)
    assert not any(a.is_inference() for a in for_training)
    assert all(torch.equal(a, b) for a, b in zip(for_inference, for_training))


def test_anchors_refuse_a_wrong_number_of_levels():
    with pytest.raises(ValueError, match="4 feature maps but 5 anchor sizes"):
        AnchorGenerator((32, 64, 128, 256, 512), (1.0,))((64, 64), [torch.zeros(1, 1, 4, 4)] * 4)


# ------------------------------------------------------------------------------------------
# Box coder


@pytest.fixture
def coder_inputs():
    generator = torch.Generator().manual_seed(14)
    # references of 20 px and more: no box is more than 40x larger, within the size clip of 62.5x
    references = random_boxes(200, 600, 800, generator, min_side=20.0)
    boxes = random_boxes(200, 600, 800, generator, min_side=2.0)
    return references, boxes, generator


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_encode_equals_torchvisions(weights, coder_inputs):
    references, boxes, _ = coder_inputs
    theirs = tv_utils.BoxCoder(weights)
    assert torch.equal(BoxCoder(weights).encode(boxes, references), theirs.encode_single(boxes, references))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_decode_equals_torchvisions(weights, coder_inputs):
    references, _, generator = coder_inputs
    k = 3
    deltas = torch.randn(references.shape[0], 4 * k, generator=generator) * 2
    deltas[:5, 2::4] = 50.0  # past the size clip
    deltas[5:10, 3::4] = -50.0
    theirs = tv_utils.BoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16))
    decoded = BoxCoder(weights).decode(deltas, references)
    assert decoded.shape == (references.shape[0], k, 4)
    expected = theirs.decode_single(deltas, references).reshape(-1, k, 4)
    torch.testing.assert_close(decoded, expected, rtol=2**-23, atol=0)
    # torchvision's batched entry point (a list of reference sets) agrees too
    torch.testing.assert_close(decoded, theirs.decode(deltas, [references[:50], references[50:]]), rtol=2**-23, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_decode_inverts_encode(weights, dtype, coder_inputs):
    references, boxes, _ = coder_inputs
    coder = BoxCoder(weights)
    references, boxes = references.to(dtype), boxes.to(dtype)
    roundtrip = coder.decode(coder.encode(boxes, references), references)[:, 0]
    tolerance = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(roundtrip, boxes, rtol=0, atol=tolerance)


def test_box_coder_works_in_float32_for_half_inputs(coder_inputs):
    """Under autocast the head's deltas may be float16: decoding is still done in float32."""
    references, boxes, generator = coder_inputs
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = torch.randn(references.shape[0], 8, generator=generator).half()
    decoded = coder.decode(deltas, references)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, coder.decode(deltas.float(), references))
    encoded = coder.encode(boxes.half(), references.half())
    assert encoded.dtype == torch.float32
    assert torch.equal(encoded, coder.encode(boxes.half().float(), references.half().float()))


def test_box_decode_clips_the_size_change():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    reference = torch.tensor([[10.0, 20.0, 26.0, 28.0]])  # 16 x 8, centre (18, 24)
    grow = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), reference)[0, 0]
    width, height = grow[2] - grow[0], grow[3] - grow[1]
    # at most a 1000/16 scale change, and the centre kept
    torch.testing.assert_close(width, torch.tensor(16 * 1000 / 16.0))
    torch.testing.assert_close(height, torch.tensor(8 * 1000 / 16.0))
    torch.testing.assert_close((grow[0] + grow[2]) / 2, torch.tensor(18.0))
    assert coder.size_clip == pytest.approx(math.log(1000 / 16))
    # shrinking is not clipped: the box becomes tiny but stays finite and ordered
    shrink = coder.decode(torch.tensor([[0.0, 0.0, -30.0, -30.0]]), reference)[0, 0]
    assert torch.isfinite(shrink).all() and (shrink[2:] >= shrink[:2]).all()
    assert (shrink[2] - shrink[0]) < 1e-9


# ------------------------------------------------------------------------------------------
# Matcher


def iou_matrices():
    generator = torch.Generator().manual_seed(15)
    gt = random_boxes(7, 200, 300, generator, min_side=10)
    predictions = random_boxes(300, 200, 300, generator, min_side=5)
    real = torchvision.ops.box_iou(gt, predictions)
    # Coarse values tie everywhere: several predictions share a ground truth's best IoU, and
    # several ground truths share a prediction's best.
    coarse = torch.randint(0, 11, (5, 400), generator=generator).float() / 10
    # A ground truth that overlaps nothing (its best IoU, 0, is "matched" at low quality).
    lonely = real.clone()
    lonely[3] = 0
    single_gt = real[:1]
    return {"real": real, "coarse": coarse, "lonely": lonely, "single_gt": single_gt}


@pytest.mark.parametrize("which", ["real", "coarse", "lonely", "single_gt"])
@pytest.mark.parametrize("high, low", [(0.7, 0.3), (0.5, 0.5), (0.6, 0.0)])
@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_equals_torchvisions(which, high, low, low_quality):
    iou = iou_matrices()[which]
    matches = Matcher(high, low, allow_low_quality_matches=low_quality)(iou)
    expected = tv_utils.Matcher(high, low, allow_low_quality_matches=low_quality)(iou.clone())
    assert matches.dtype == torch.int64
    assert torch.equal(matches, expected)
    if low_quality:
        assert (matches >= 0).sum() >= (Matcher(high, low)(iou) >= 0).sum()


def test_matcher_codes():
    iou = torch.tensor([[0.9, 0.4, 0.1, 0.0], [0.2, 0.6, 0.25, 0.0]])
    assert Matcher(0.7, 0.3)(iou).tolist() == [0, Matcher.BETWEEN, Matcher.BELOW_LOW, Matcher.BELOW_LOW]
    assert (Matcher.BELOW_LOW, Matcher.BETWEEN) == (tv_utils.Matcher.BELOW_LOW_THRESHOLD, tv_utils.Matcher.BETWEEN_THRESHOLDS)


@pytest.mark.parametrize("shape, what", [((0, 5), "ground-truth boxes"), ((3, 0), "predictions")])
def test_matcher_refuses_empty_matrices(shape, what):
    with pytest.raises(ValueError, match=f"no {what}"):
        Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.zeros(shape))
    with pytest.raises(ValueError):  # torchvision refuses them too
        tv_utils.Matcher(0.7, 0.3)(torch.zeros(shape))


def test_matcher_refuses_low_above_high():
    with pytest.raises(ValueError, match="low threshold"):
        Matcher(0.3, 0.7)


# ------------------------------------------------------------------------------------------
# Sampler


def sampler_labels():
    generator = torch.Generator().manual_seed(16)
    many_positives = torch.randint(-1, 4, (2000,), generator=generator)  # positives over the cap
    few_positives = torch.where(torch.rand(1000, generator=generator) < 0.01, 1, torch.randint(-1, 1, (1000,), generator=generator))
    few_of_both = torch.tensor([1, 0, -1, -1, 2, 0, -1])
    only_ignored = torch.full((50,), -1)
    return [many_positives, few_positives, few_of_both, only_ignored]


@pytest.mark.parametrize("batch_size, fraction", [(256, 0.5), (512, 0.25), (10, 0.3)])
def test_sampler_counts(batch_size, fraction):
    labels = sampler_labels()
    positives, negatives = BalancedSampler(batch_size, fraction)(labels)
    for image_labels, positive, negative in zip(labels, positives, negatives):
        assert positive.dtype == negative.dtype == torch.bool and positive.shape == image_labels.shape
        num_positive = min(int((image_labels >= 1).sum()), int(batch_size * fraction))
        num_negative = min(int((image_labels == 0).sum()), batch_size - num_positive)
        assert int(positive.sum()) == num_positive
        assert int(negative.sum()) == num_negative
        assert (image_labels[positive] >= 1).all()
        assert (image_labels[negative] == 0).all()
        assert not (positive & negative).any()
        assert not ((positive | negative) & (image_labels == -1)).any()


def test_sampler_draws_as_torchvision_does():
    labels = sampler_labels()
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        positives, negatives = BalancedSampler(256, 0.5)(labels)
        torch.manual_seed(seed)
        expected_positives, expected_negatives = tv_utils.BalancedPositiveNegativeSampler(256, 0.5)(labels)
        for mine, theirs in zip(positives + negatives, expected_positives + expected_negatives):
            assert torch.equal(mine, theirs.bool())
    # and the draws are random: another seed picks other anchors
    torch.manual_seed(100)
    other, _ = BalancedSampler(256, 0.5)(labels)
    assert not torch.equal(other[0], positives[0])


# ------------------------------------------------------------------------------------------
# Image transform


def transform_pair(min_size=(96, 128, 160), max_size=200):
    ours = ImageTransform(min_size, max_size, MEAN, STD, 32)
    theirs = GeneralizedRCNNTransform(min_size, max_size, list(MEAN), list(STD), size_divisible=32)
    return ours, theirs


def transform_inputs():
    generator = torch.Generator().manual_seed(20)
    images = [torch.rand(3, 90, 130, generator=generator), torch.rand(3, 151, 77, generator=generator), torch.rand(3, 64, 64, generator=generator)]
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        boxes = random_boxes(3, h, w, generator, min_side=4)
        masks = (torch.rand(3, h, w, generator=generator) > 0.5).to(torch.uint8)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "masks": masks})
    return images, targets


def test_transform_eval_equals_torchvisions():
    ours, theirs = transform_pair()
    ours.eval(), theirs.eval()
    images, _ = transform_inputs()
    batch, sizes, targets = ours(images)
    expected, _ = theirs(images)
    assert targets is None
    assert sizes == [tuple(s) for s in expected.image_sizes]
    assert batch.shape == expected.tensors.shape and batch.shape[-1] % 32 == 0 and batch.shape[-2] % 32 == 0
    assert torch.equal(batch, expected.tensors)
    assert all(min(s) == 160 or max(s) == 200 for s in sizes)  # eval uses the last min_size


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transform_train_equals_torchvisions(seed):
    ours, theirs = transform_pair()
    ours.train(), theirs.train()
    images, targets = transform_inputs()
    torch.manual_seed(seed)
    batch, sizes, resized = ours(images, [dict(t) for t in targets])
    torch.manual_seed(seed)
    expected, expected_targets = theirs(images, [dict(t) for t in targets])
    assert sizes == [tuple(s) for s in expected.image_sizes]
    assert torch.equal(batch, expected.tensors)
    for mine, theirs_target, original in zip(resized, expected_targets, targets):
        assert torch.equal(mine["boxes"], theirs_target["boxes"])
        assert torch.equal(mine["masks"], theirs_target["masks"])
        assert mine["masks"].dtype == torch.uint8
        assert torch.equal(mine["labels"], original["labels"])
    # the caller's targets are left alone
    assert all(t["masks"].shape[-2:] == img.shape[-2:] for t, img in zip(targets, images))


def test_transform_multiscale_draws_several_sizes():
    ours, _ = transform_pair(min_size=(64, 96, 128, 160), max_size=1000)
    ours.train()
    image = torch.rand(3, 50, 50)
    torch.manual_seed(0)
    drawn = {ours([image])[1][0] for _ in range(30)}
    assert drawn == {(s, s) for s in (64, 96, 128, 160)}


def test_transform_uint8_equals_float_over_255():
    ours, _ = transform_pair()
    ours.eval()
    generator = torch.Generator().manual_seed(21)
    images = [torch.randint(0, 256, (3, 70, 110), generator=generator, dtype=torch.uint8),
              torch.randint(0, 256, (3, 120, 90), generator=generator, dtype=torch.uint8)]
    from_uint8, sizes_uint8, _ = ours(images)
    from_float, sizes_float, _ = ours([img.float() / 255 for img in images])
    assert sizes_uint8 == sizes_float
    assert torch.equal(from_uint8, from_float)


def test_resize_boxes_back_equals_torchvisions_postprocess():
    _, theirs = transform_pair()
    theirs.eval()  # torchvision maps boxes back at inference only
    generator = torch.Generator().manual_seed(22)
    boxes = random_boxes(20, 128, 160, generator)
    expected = theirs.postprocess([{"boxes": boxes.clone()}], [(128, 160)], [(90, 130)])[0]["boxes"]
    assert torch.equal(resize_boxes(boxes, (128, 160), (90, 130)), expected)


# ------------------------------------------------------------------------------------------
# Losses


def test_fast_rcnn_losses_equal_torchvisions():
    generator = torch.Generator().manual_seed(23)
    num_classes, counts = 5, [30, 17]
    logits = torch.randn(sum(counts), num_classes, generator=generator, requires_grad=True)
    deltas = torch.randn(sum(counts), 4 * num_classes, generator=generator, requires_grad=True)
    labels = [torch.randint(0, num_classes, (n,), generator=generator) for n in counts]
    targets = [torch.randn(n, 4, generator=generator) for n in counts]
    mine = fast_rcnn_losses(logits, deltas, labels, targets)
    mine_grads = torch.autograd.grad(sum(mine), (logits, deltas))
    expected = fastrcnn_loss(logits, deltas, labels, targets)
    expected_grads = torch.autograd.grad(sum(expected), (logits, deltas))
    for a, b in zip(mine + mine_grads, expected + expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def mask_loss_inputs(generator, positives=(6, 4)):
    num_classes, size = 4, 28
    proposals, gt_masks, gt_labels, matched = [], [], [], []
    for n in positives:
        h, w = 60, 80
        gt = 3
        proposals.append(random_boxes(n, h, w, generator, min_side=3))
        gt_masks.append((torch.rand(gt, h, w, generator=generator) > 0.4).to(torch.uint8))
        gt_labels.append(torch.randint(1, num_classes, (gt,), generator=generator))
        matched.append(torch.randint(0, gt, (n,), generator=generator))
    logits = torch.randn(sum(positives), num_classes, size, size, generator=generator, requires_grad=True)
    return logits, proposals, gt_masks, gt_labels, matched


def test_mask_loss_equals_torchvisions():
    generator = torch.Generator().manual_seed(24)
    logits, proposals, gt_masks, gt_labels, matched = mask_loss_inputs(generator)
    mine = mask_loss(logits, proposals, gt_masks, gt_labels, matched)
    (mine_grad,) = torch.autograd.grad(mine, logits)
    expected = maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(mine, expected)
    torch.testing.assert_close(mine_grad, expected_grad)
    # only each RoI's own class gets a gradient
    wrong = torch.ones(logits.shape[:2], dtype=torch.bool)
    wrong[torch.arange(logits.shape[0]), torch.cat([l[m] for l, m in zip(gt_labels, matched)])] = False
    assert (mine_grad[wrong] == 0).all()


def test_mask_loss_without_positives_is_a_zero_with_a_gradient():
    generator = torch.Generator().manual_seed(25)
    _, _, gt_masks, gt_labels, _ = mask_loss_inputs(generator)
    logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    matched = [torch.zeros(0, dtype=torch.int64)] * 2
    loss = mask_loss(logits, empty, gt_masks, gt_labels, matched)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
    assert loss.item() == maskrcnn_loss(logits, empty, gt_masks, gt_labels, matched).item()
    # and also when an image has no ground-truth masks at all
    no_gt = [torch.zeros(0, 60, 80, dtype=torch.uint8)] * 2
    loss = mask_loss(logits, empty, no_gt, [torch.zeros(0, dtype=torch.int64)] * 2, matched)
    assert loss.item() == 0.0 and loss.requires_grad


def test_rpn_losses_equal_torchvisions():
    generator = torch.Generator().manual_seed(26)
    anchors_per_image = 500
    objectness = torch.randn(2 * anchors_per_image, 1, generator=generator, requires_grad=True)
    deltas = torch.randn(2 * anchors_per_image, 4, generator=generator, requires_grad=True)
    labels = [torch.randint(-1, 2, (anchors_per_image,), generator=generator).float() for _ in range(2)]
    regression_targets = [torch.randn(anchors_per_image, 4, generator=generator) for _ in range(2)]
    reference = TVRegionProposalNetwork(
        TVAnchorGenerator(), nn.Identity(), 0.7, 0.3, 256, 0.5, {"training": 10, "testing": 10}, {"training": 10, "testing": 10}, 0.7
    )
    torch.manual_seed(5)
    mine = rpn_losses(objectness, deltas, labels, torch.cat(regression_targets), BalancedSampler(256, 0.5))
    torch.manual_seed(5)
    expected = reference.compute_loss(objectness, deltas, labels, regression_targets)
    for a, b in zip(mine, expected):
        torch.testing.assert_close(a, b)
    mine_grads = torch.autograd.grad(sum(mine), (objectness, deltas))
    expected_grads = torch.autograd.grad(sum(expected), (objectness, deltas))
    for a, b in zip(mine_grads, expected_grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_predictor_logits_for_equals_forward(channels_last):
    torch.manual_seed(27)
    predictor = MaskPredictor(16, 16, 7)
    with torch.no_grad():
        predictor.mask_fcn_logits.bias.normal_()
    x = torch.randn(9, 16, 14, 14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 6, 3, 3, 2, 5, 6, 4])
    with torch.no_grad():
        every = predictor(x)
        chosen = predictor.logits_for(x, labels)
    assert every.shape == (9, 7, 28, 28) and chosen.shape == (9, 28, 28)
    torch.testing.assert_close(chosen, every[torch.arange(9), labels], rtol=1e-5, atol=1e-5)


def test_rpn_head_flattening_follows_the_anchor_order():
    torch.manual_seed(28)
    head = RPNHead(8, 3)
    features = [torch.randn(2, 8, h, w) for h, w in [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]]
    logits, deltas = head(features)
    objectness = torch.cat([_flatten_by_anchor(level, 1) for level in logits], dim=1).flatten(0, -2)
    box_deltas = torch.cat([_flatten_by_anchor(level, 4) for level in deltas], dim=1).reshape(-1, 4)
    expected_objectness, expected_deltas = concat_box_prediction_layers(logits, deltas)
    assert torch.equal(objectness, expected_objectness)
    assert torch.equal(box_deltas, expected_deltas)
    # and the head is torchvision's, key for key
    theirs = TVRPNHead(8, 3)
    theirs.load_state_dict(head.state_dict(), strict=True)
    expected_logits, expected_deltas = theirs(features)
    for a, b in zip(logits + deltas, expected_logits + expected_deltas):
        assert torch.equal(a, b)


def rpn_pair(seed: int):
    torch.manual_seed(seed)
    sizes, ratios = (16, 32, 64, 128, 256), (0.5, 1.0, 2.0)
    settings = {
        "fg_iou_thresh": 0.7, "bg_iou_thresh": 0.3, "batch_size_per_image": 64, "positive_fraction": 0.5,
        "pre_nms_top_n": {"training": 300, "testing": 200}, "post_nms_top_n": {"training": 150, "testing": 100}, "nms_thresh": 0.7,
    }
    head = RPNHead(8, 3)
    with torch.no_grad():  # large enough weights that the proposals spread over the image
        for parameter in head.parameters():
            parameter.normal_(0, 0.3)
    ours = RegionProposalNetwork(AnchorGenerator(sizes, ratios), head, **settings)
    their_head = TVRPNHead(8, 3)
    their_head.load_state_dict(head.state_dict())
    theirs = TVRegionProposalNetwork(TVAnchorGenerator(tuple((s,) for s in sizes), (ratios,) * 5), their_head, **settings)
    batch_size, image_sizes = (128, 160), [(128, 150), (100, 160)]
    features = {str(i): torch.randn(2, 8, 128 // s, 160 // s) for i, s in enumerate((4, 8, 16, 32))}
    features["pool"] = torch.randn(2, 8, 2, 3)
    return ours, theirs, batch_size, image_sizes, features


def test_rpn_proposals_equal_torchvisions():
    ours, theirs, batch_size, image_sizes, features = rpn_pair(29)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        mine, _ = ours(list(features.values()), batch_size, image_sizes)
        expected, _ = theirs(ImageList(torch.zeros(2, 3, *batch_size), image_sizes), features)
    for a, b in zip(mine, expected):
        assert a.shape[0] > 20
        assert torch.equal(a, b)


def test_rpn_training_losses_equal_torchvisions():
    ours, theirs, batch_size, image_sizes, features = rpn_pair(30)
    ours.train(), theirs.train()
    generator = torch.Generator().manual_seed(31)
    targets = [{"boxes": random_boxes(4, h, w, generator, min_side=10)} for h, w in image_sizes]
    torch.manual_seed(32)
    mine, mine_losses = ours(list(features.values()), batch_size, image_sizes, targets)
    torch.manual_seed(32)
    expected, expected_losses = theirs(ImageList(torch.zeros(2, 3, *batch_size), image_sizes), features, targets)
    for a, b in zip(mine, expected):
        assert torch.equal(a, b)
    assert set(mine_losses) == set(expected_losses) == {"loss_objectness", "loss_rpn_box_reg"}
    for name in expected_losses:
        torch.testing.assert_close(mine_losses[name], expected_losses[name], msg=name)


def roi_heads_pair():
    settings = {
        "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5, "batch_size_per_image": 64, "positive_fraction": 0.25,
        "bbox_reg_weights": (10.0, 10.0, 5.0, 5.0), "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 30,
    }
    ours = RoIHeads(nn.Identity(), BoxHead(8, 8), BoxPredictor(8, 5), **settings)
    theirs = TVRoIHeads(None, None, None, **settings)
    return ours, theirs


def test_roi_heads_training_samples_equal_torchvisions():
    ours, theirs = roi_heads_pair()
    generator = torch.Generator().manual_seed(33)
    image_sizes = [(100, 120), (80, 90)]
    targets = [
        {"boxes": random_boxes(3, 100, 120, generator, min_side=15), "labels": torch.tensor([1, 4, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
    ]
    proposals = [random_boxes(200, h, w, generator, min_side=2) for h, w in image_sizes]
    # proposals close to the objects, so that some are positive
    proposals[0] = torch.cat([targets[0]["boxes"].repeat(10, 1) + torch.randn(30, 4, generator=generator) * 3, proposals[0]])
    torch.manual_seed(34)
    mine = ours.sample_proposals([p.clone() for p in proposals], targets)
    torch.manual_seed(34)
    expected = theirs.select_training_samples([p.clone() for p in proposals], [dict(t) for t in targets])
    for mine_part, expected_part in zip(mine, expected):
        for a, b in zip(mine_part, expected_part):
            assert torch.equal(a, b)
    sampled_labels = mine[2]
    assert (sampled_labels[0] > 0).sum() > 0 and (sampled_labels[1] == 0).all()


def test_roi_heads_detections_equal_torchvisions():
    ours, theirs = roi_heads_pair()
    generator = torch.Generator().manual_seed(35)
    image_sizes = [(100, 120), (80, 90)]
    proposals = [random_boxes(150, h, w, generator, min_side=3) for h, w in image_sizes]
    logits = torch.randn(300, 5, generator=generator) * 2
    deltas = torch.randn(300, 20, generator=generator)
    mine = ours.select_detections(logits, deltas, proposals, image_sizes)
    boxes, scores, labels = theirs.postprocess_detections(logits, deltas, proposals, image_sizes)
    for detection, b, s, l in zip(mine, boxes, scores, labels):
        assert len(detection["boxes"]) == 30  # capped at detections_per_img
        assert torch.equal(detection["boxes"], b)
        assert torch.equal(detection["scores"], s)
        assert torch.equal(detection["labels"], l)
