"""The model as its users meet it: the config, inference and training outputs, input checks,
learning, and checkpoints.

The light config (ResNet-18-FPN) keeps this quick on a CPU. Where torchvision defines the
expected value (the defaults of maskrcnn_resnet50_fpn, its state dicts), it is read from
torchvision, not written down here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torchvision
from torchvision.models._meta import _COCO_CATEGORIES

from maskray.model import LOSS_NAMES, MaskRCNN, MaskRCNNConfig
from maskray.model.config import default_class_names
from maskray.model.ops import MultiScaleRoIAlign, MultiScaleRoIPool

CLASS_NAMES = ("__background__", "cat", "dog", "bird")
# Training tests resize to this (the preset's 320 would only make them slower).
SMALL = {"min_size": (160,), "max_size": 256}


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def light_model():
    """The light preset, as a user runs it: eval mode, inference layout."""
    torch.manual_seed(0)
    return MaskRCNN(MaskRCNNConfig.light(num_classes=4, class_names=CLASS_NAMES)).eval().to_inference_layout()


@pytest.fixture(scope="module")
def eval_images():
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.rand(3, 150, 200, generator=generator) * 255).to(torch.uint8),
        torch.rand(3, 181, 133, generator=generator),
    ]


@pytest.fixture(scope="module")
def detections(light_model, eval_images):
    return light_model(eval_images)


def square_target(height: int, width: int, box: tuple[int, int, int, int], label: int = 1) -> dict[str, torch.Tensor]:
    x1, y1, x2, y2 = box
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, y1:y2, x1:x2] = 1
    return {"boxes": torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), "labels": torch.tensor([label]), "masks": masks}


def training_batch():
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 96, 128, generator=generator), (torch.rand(3, 120, 90, generator=generator) * 255).to(torch.uint8)]
    first = square_target(96, 128, (10, 20, 70, 80), label=1)
    second = square_target(120, 90, (30, 10, 80, 60), label=3)
    second = {
        "boxes": torch.cat([second["boxes"], torch.tensor([[5.0, 70.0, 40.0, 115.0]])]),
        "labels": torch.tensor([3, 2]),
        "masks": torch.cat([second["masks"], square_target(120, 90, (5, 70, 40, 115))["masks"]]),
    }
    return images, [first, second]


@pytest.fixture(scope="module")
def train_model():
    torch.manual_seed(3)
    return MaskRCNN(MaskRCNNConfig.light(num_classes=4, **SMALL)).train()


def decode(rle: dict) -> np.ndarray:
    return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})


def rle_area(rle: dict) -> int:
    return int(mask_util.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


# ------------------------------------------------------------------------------------------
# Config


@pytest.fixture(scope="module")
def torchvision_maskrcnn():
    """torchvision's maskrcnn_resnet50_fpn with its defaults, and 5 classes (not COCO's 91)."""
    torch.manual_seed(4)
    return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).eval()


def test_resnet50_fpn_defaults_are_torchvisions(torchvision_maskrcnn):
    reference = torchvision_maskrcnn
    config = MaskRCNNConfig.resnet50_fpn()
    assert config == MaskRCNNConfig()
    assert config.num_classes == len(_COCO_CATEGORIES) == 91
    assert config.backbone == "resnet50"
    transform = reference.transform
    assert config.min_size == tuple(transform.min_size)
    assert config.max_size == transform.max_size
    assert config.image_mean == tuple(transform.image_mean) and config.image_std == tuple(transform.image_std)
    assert config.size_divisible == transform.size_divisible
    assert config.fpn_channels == reference.backbone.out_channels
    rpn = reference.rpn
    assert tuple((s,) for s in config.anchor_sizes) == rpn.anchor_generator.sizes
    assert (config.aspect_ratios,) * 5 == rpn.anchor_generator.aspect_ratios
    assert {"training": config.rpn_pre_nms_top_n_train, "testing": config.rpn_pre_nms_top_n_test} == rpn._pre_nms_top_n
    assert {"training": config.rpn_post_nms_top_n_train, "testing": config.rpn_post_nms_top_n_test} == rpn._post_nms_top_n
    assert (config.rpn_nms_thresh, config.rpn_score_thresh) == (rpn.nms_thresh, rpn.score_thresh)
    assert (config.rpn_fg_iou_thresh, config.rpn_bg_iou_thresh) == (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold)
    assert (config.rpn_batch_size_per_image, config.rpn_positive_fraction) == (
        rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction)
    heads = reference.roi_heads
    assert (config.box_score_thresh, config.box_nms_thresh, config.box_detections_per_img) == (
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    assert (config.box_fg_iou_thresh, config.box_bg_iou_thresh) == (heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold)
    assert (config.box_batch_size_per_image, config.box_positive_fraction) == (
        heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction)
    assert config.bbox_reg_weights == heads.box_coder.weights
    assert (config.box_pool_size,) * 2 == tuple(heads.box_roi_pool.output_size)
    assert (config.mask_pool_size,) * 2 == tuple(heads.mask_roi_pool.output_size)
    assert config.pool_sampling_ratio == heads.box_roi_pool.sampling_ratio == heads.mask_roi_pool.sampling_ratio
    assert config.representation_size == heads.box_head.fc7.out_features
    assert config.mask_head_layers == len(heads.mask_head)
    assert config.mask_head_channels == heads.mask_head[0][0].out_channels == heads.mask_predictor.conv5_mask.out_channels
    # torchvision's default for trained weights (it frees all five stages only for random init)
    assert config.trainable_backbone_layers == 3
    # the published numbers, for the record
    assert (config.min_size, config.max_size, config.box_score_thresh, config.box_nms_thresh) == ((800,), 1333, 0.05, 0.5)
    assert (config.rpn_pre_nms_top_n_train, config.rpn_post_nms_top_n_train) == (2000, 2000)
    assert (config.rpn_pre_nms_top_n_test, config.rpn_post_nms_top_n_test) == (1000, 1000)


def test_from_torchvision_builds_torchvisions_architecture(torchvision_maskrcnn):
    """A torchvision model of 5 classes, built with weights=None (trainable BatchNorm, so its
    state dict counts batches), loads strictly; classes get placeholder names."""
    reference = torchvision_maskrcnn
    state = reference.state_dict()
    keys_before = list(state)
    model = MaskRCNN.from_torchvision(state)
    assert list(state) == keys_before  # the caller's dict is left alone
    assert model.config.num_classes == 5 and model.config.mask and not model.training
    assert model.class_names == ("__background__", "class_1", "class_2", "class_3", "class_4")
    ours = model.state_dict()
    expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    # the built modules carry the config's settings as torchvision's do
    assert model.rpn._pre_nms_top_n == reference.rpn._pre_nms_top_n
    assert model.rpn._post_nms_top_n == reference.rpn._post_nms_top_n
    assert (model.rpn.nms_thresh, model.rpn.min_size) == (reference.rpn.nms_thresh, reference.rpn.min_size)
    assert model.rpn.anchor_generator.sizes == tuple(s for (s,) in reference.rpn.anchor_generator.sizes)
    assert model.roi_heads.box_coder.weights == reference.roi_heads.box_coder.weights
    assert model.roi_heads.box_coder.size_clip == pytest.approx(reference.roi_heads.box_coder.bbox_xform_clip)
    assert model.roi_heads.box_roi_pool.output_size == tuple(reference.roi_heads.box_roi_pool.output_size)
    assert model.roi_heads.mask_roi_pool.output_size == tuple(reference.roi_heads.mask_roi_pool.output_size)
    assert model.transform.min_size == tuple(reference.transform.min_size)


def test_light_preset():
    config = MaskRCNNConfig.light(num_classes=4)
    assert (config.backbone, config.fpn_channels, config.min_size, config.max_size) == ("resnet18", 128, (320,), 512)
    assert config.class_names == ("__background__", "class_1", "class_2", "class_3")
    assert MaskRCNNConfig.light(num_classes=4, max_size=400).max_size == 400  # overrides win


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_classes", 1),
        ("class_names", ("__background__", "a")),
        ("backbone", "resnet9"),
        ("trainable_backbone_layers", 6),
        ("trainable_backbone_layers", -1),
        ("pooler", "max"),
        ("min_size", (0,)),
        ("min_size", ()),
        ("max_size", 0),
        ("anchor_sizes", (32, 64, 128)),
        ("box_score_thresh", 1.5),
        ("box_nms_thresh", -0.1),
        ("rpn_nms_thresh", 2.0),
        ("mask_threshold", 1.1),
        ("cuda_autocast", "int8"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        MaskRCNNConfig.light(**{"num_classes": 4, field: value})


@pytest.mark.parametrize(
    "config",
    [
        MaskRCNNConfig.resnet50_fpn(),
        MaskRCNNConfig.light(num_classes=4, class_names=CLASS_NAMES),
        MaskRCNNConfig.light(num_classes=3, min_size=(256, 288, 320), pooler="roi_pool", mask=False, cuda_autocast=None),
    ],
)
def test_config_dict_roundtrip(config):
    data = config.to_dict()
    assert all(not isinstance(v, tuple) for v in data.values())  # plain data
    assert MaskRCNNConfig.from_dict(data) == config
    # JSON (a manifest) turns tuples to lists; they come back as tuples
    restored = MaskRCNNConfig.from_dict(json.loads(json.dumps(data)))
    assert restored == config
    assert isinstance(restored.min_size, tuple) and isinstance(restored.class_names, tuple)


def test_config_from_dict_names_unknown_fields():
    data = MaskRCNNConfig.light(num_classes=4).to_dict()
    data["min_szie"] = [300]
    data["zzz"] = 1
    with pytest.raises(ValueError, match=r"unknown fields \['min_szie', 'zzz'\]"):
        MaskRCNNConfig.from_dict(data)


def test_config_replace():
    config = MaskRCNNConfig.light(num_classes=4, class_names=CLASS_NAMES)
    assert config.replace(num_classes=6).class_names == default_class_names(6)
    assert default_class_names(6) == ("__background__",) + tuple(f"class_{i}" for i in range(1, 6))
    names = ("__background__", "a", "b")
    assert config.replace(num_classes=3, class_names=names).class_names == names
    changed = config.replace(min_size=(256,))
    assert changed.class_names == CLASS_NAMES and changed.min_size == (256,)
    assert config.min_size == (320,)  # frozen: the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_classes = 5
    with pytest.raises(ValueError, match="class_names"):
        config.replace(num_classes=3, class_names=CLASS_NAMES)


def test_config_is_hashable():
    a = MaskRCNNConfig.light(num_classes=4)
    b = MaskRCNNConfig.from_dict(json.loads(json.dumps(a.to_dict())))
    assert hash(a) == hash(b)
    assert len({a, b, MaskRCNNConfig.light(num_classes=5)}) == 2


# ------------------------------------------------------------------------------------------
# Inference


def test_eval_returns_the_documented_dict(light_model, eval_images, detections):
    assert isinstance(detections, list) and len(detections) == len(eval_images)
    for image, detection in zip(eval_images, detections):
        height, width = image.shape[-2:]
        assert set(detection) == {"boxes", "labels", "scores", "masks", "areas"}
        boxes, labels, scores = detection["boxes"], detection["labels"], detection["scores"]
        n = boxes.shape[0]
        assert 0 < n <= light_model.config.box_detections_per_img  # random weights still detect
        assert boxes.dtype == torch.float32 and boxes.shape == (n, 4)
        assert labels.dtype == torch.int64 and labels.shape == (n,)
        assert scores.dtype == torch.float32 and scores.shape == (n,)
        # in the original image's pixels
        assert (boxes >= 0).all()
        assert (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((labels >= 1) & (labels < light_model.config.num_classes)).all()
        assert (scores[:-1] >= scores[1:]).all()
        assert (scores > light_model.config.box_score_thresh).all() and (scores <= 1).all()
        # masks: COCO RLE of the full image
        masks, areas = detection["masks"], detection["areas"]
        assert isinstance(masks, list) and len(masks) == n
        assert areas.dtype == torch.int64 and areas.shape == (n,)
        for rle, area, box in zip(masks, areas.tolist(), boxes.tolist()):
            assert set(rle) == {"size", "counts"} and rle["size"] == [height, width] and isinstance(rle["counts"], str)
            dense = decode(rle)
            assert dense.shape == (height, width)
            assert area == rle_area(rle) == int(dense.sum())
            if area:  # inside its box, grown by torchvision's one-pixel mask padding (30/28)
                ys, xs = np.nonzero(dense)
                x1, y1, x2, y2 = box
                grow_x, grow_y = (x2 - x1) / 28 + 1, (y2 - y1) / 28 + 1
                assert xs.min() >= x1 - grow_x and xs.max() <= x2 + grow_x
                assert ys.min() >= y1 - grow_y and ys.max() <= y2 + grow_y
    assert any(a > 0 for d in detections for a in d["areas"].tolist())


def test_eval_of_uint8_equals_eval_of_float(light_model, eval_images, detections):
    as_float = [img.float() / 255 if img.dtype == torch.uint8 else img for img in eval_images]
    for mine, expected in zip(light_model(as_float), detections):
        for key in ("boxes", "labels", "scores", "areas"):
            assert torch.equal(mine[key], expected[key]), key
        assert mine["masks"] == expected["masks"]


def test_eval_with_no_detections(eval_images):
    torch.manual_seed(5)
    model = MaskRCNN(MaskRCNNConfig.light(num_classes=4, box_score_thresh=1.0, **SMALL)).eval()
    (detection,) = model(eval_images[:1])
    assert detection["boxes"].shape == (0, 4) and detection["labels"].dtype == torch.int64
    assert detection["masks"] == [] and detection["areas"].shape == (0,) and detection["areas"].dtype == torch.int64


@pytest.mark.parametrize("height, width", [(1, 20000), (20000, 1), (3, 2000)])
def test_very_thin_strips_are_resized_to_at_least_one_pixel(light_model, height, width):
    """A strip wider than max_size:1 would shrink to zero pixels across; it keeps one instead and
    gives detections in its own coordinates, masks of its own size."""
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch, sizes, _ = light_model.transform([image])
    assert min(sizes[0]) == 1 and max(sizes[0]) <= light_model.config.max_size
    (detection,) = light_model([image])
    assert all(mask["size"] == [height, width] for mask in detection["masks"])
    boxes = detection["boxes"]
    assert bool((boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_eval_of_other_float_dtypes(light_model, eval_images, dtype):
    image = eval_images[1]
    try:
        (detection,) = light_model([image.to(dtype)])
    except ValueError as error:  # refusing it plainly would do too
        assert str(dtype).removeprefix("torch.") in str(error)
        return
    (expected,) = light_model([image.to(dtype).float()])
    torch.testing.assert_close(detection["boxes"], expected["boxes"])


# ------------------------------------------------------------------------------------------
# Training


def check_losses(losses: dict, names) -> None:
    assert set(losses) == set(names)
    for name, value in losses.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
        assert torch.isfinite(value), name
        assert value.requires_grad, name


def test_train_returns_the_five_losses(train_model):
    images, targets = training_batch()
    train_model.zero_grad()
    losses = train_model(images, targets)
    check_losses(losses, LOSS_NAMES)
    assert all(v > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in train_model.named_parameters()}
    for name in ("roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.box_predictor.cls_score.weight",
                 "rpn.head.cls_logits.weight", "backbone.fpn.inner_blocks.0.0.weight", "backbone.body.layer4.0.conv1.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # trainable_backbone_layers=3: the stem and layer1 stay frozen
    assert grads["backbone.body.conv1.weight"] is None and grads["backbone.body.layer1.0.conv1.weight"] is None
    # the caller's targets are not changed by the resizing
    assert targets[0]["masks"].shape == (1, 96, 128) and targets[0]["boxes"].tolist() == [[10.0, 20.0, 70.0, 80.0]]


def test_train_on_an_image_without_objects(train_model):
    image = torch.rand(3, 100, 120)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 100, 120, dtype=torch.uint8)}
    losses = train_model([image], [empty])
    check_losses(losses, LOSS_NAMES)
    for name in ("loss_box_reg", "loss_mask", "loss_rpn_box_reg"):
        assert losses[name].item() == 0.0, name
    assert losses["loss_classifier"] > 0 and losses["loss_objectness"] > 0
    sum(losses.values()).backward()
    # ... and next to an image with objects
    images, targets = training_batch()
    losses = train_model([image, images[0]], [empty, targets[0]])
    check_losses(losses, LOSS_NAMES)
    assert losses["loss_mask"] > 0
    sum(losses.values()).backward()


def test_roi_pool_trains_and_infers(light_model, eval_images):
    torch.manual_seed(6)
    model = MaskRCNN(MaskRCNNConfig.light(num_classes=4, pooler="roi_pool", **SMALL))
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIPool)
    assert isinstance(model.roi_heads.mask_roi_pool, MultiScaleRoIPool)
    assert isinstance(light_model.roi_heads.box_roi_pool, MultiScaleRoIAlign)  # the default
    images, targets = training_batch()
    losses = model.train()(images, targets)
    check_losses(losses, LOSS_NAMES)
    sum(losses.values()).backward()
    assert model.roi_heads.box_head.fc6.weight.grad.abs().sum() > 0
    (detection,) = model.eval()(eval_images[:1])
    assert len(detection["boxes"]) > 0 and len(detection["masks"]) == len(detection["boxes"])


def test_faster_rcnn_without_the_mask_head(eval_images):
    torch.manual_seed(7)
    model = MaskRCNN(MaskRCNNConfig.light(num_classes=4, mask=False, **SMALL))
    assert model.roi_heads.mask_head is None and model.roi_heads.mask_predictor is None
    assert not any(k.startswith("roi_heads.mask") for k in model.state_dict())
    images, targets = training_batch()
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]  # no masks needed
    losses = model.train()(images, targets)
    check_losses(losses, [n for n in LOSS_NAMES if n != "loss_mask"])
    assert len(losses) == 4
    sum(losses.values()).backward()
    (detection,) = model.eval()(eval_images[:1])
    assert set(detection) == {"boxes", "labels", "scores", "areas"}
    boxes = detection["boxes"]
    assert len(boxes) > 0
    torch.testing.assert_close(detection["areas"], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def test_a_few_sgd_steps_learn_one_object():
    """A real learning check: 30 steps of plain SGD on one image with one square bring the total
    loss well under half of where it started, and each head's loss down."""
    torch.manual_seed(0)
    config = MaskRCNNConfig.light(
        num_classes=2, min_size=(128,), max_size=128, trainable_backbone_layers=0,
        # fewer proposals and samples than the preset: the same learning, faster steps
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_batch_size_per_image=64, box_batch_size_per_image=64,
    )
    model = MaskRCNN(config).train()
    image = torch.full((3, 128, 128), 0.2)
    image[:, 40:90, 30:80] = torch.tensor([0.9, 0.3, 0.1])[:, None, None]
    target = square_target(128, 128, (30, 40, 80, 90))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.002, momentum=0.9)
    history = []
    for _ in range(30):
        losses = model([image], [target])
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 5.0)  # random weights make the first gradients large
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    totals = [sum(h.values()) for h in history]
    assert all(math.isfinite(t) for t in totals)
    # (over seeds 0-5 the ratio is 0.06-0.44; 1.0 would mean nothing was learnt)
    start, end = np.mean(totals[:3]), np.mean(totals[-3:])
    assert end < 0.5 * start, totals
    for name in ("loss_classifier", "loss_mask", "loss_objectness"):
        assert np.mean([h[name] for h in history[-3:]]) < np.mean([h[name] for h in history[:3]]), name


def test_switching_between_eval_and_train(train_model):
    """Inference (under inference_mode) then training then inference on the same model and sizes."""
    images, targets = training_batch()
    try:
        first = train_model.eval()(images[:1])
        losses = train_model.train()(images[:1], targets[:1])
        check_losses(losses, LOSS_NAMES)
        sum(losses.values()).backward()
        again = train_model.eval()(images[:1])
        _assert_same_detections(first, again)  # no optimiser step: the same weights
    finally:
        train_model.train()


# ------------------------------------------------------------------------------------------
# Bad inputs


def _image(*shape, dtype=torch.float32):
    return torch.rand(*shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 255, shape, dtype=dtype)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(2, 3, 64, 64), r"images must be a list of 3xHxW tensors.*got Tensor"),
        (torch.rand(3, 64, 64), r"images must be a list of 3xHxW tensors.*got Tensor"),
        ([], r"images is an empty list"),
        ([torch.rand(1, 64, 64)], r"images\[0\] must have shape 3xHxW, got \(1, 64, 64\)"),
        ([torch.rand(3, 64, 64), torch.rand(64, 64)], r"images\[1\] must have shape 3xHxW, got \(64, 64\)"),
        ([torch.randint(0, 255, (3, 64, 64), dtype=torch.int32)], r"images\[0\] must be uint8 or floating point, got torch.int32"),
        ([torch.rand(3, 0, 64)], r"images\[0\] is empty"),
        ([np.zeros((3, 64, 64), dtype=np.float32)], r"images\[0\] must be a Tensor, got ndarray"),
    ],
)
def test_bad_images_are_refused(light_model, images, message):
    with pytest.raises(ValueError, match=message):
        light_model(images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for images on two devices")
def test_images_on_different_devices_are_refused(light_model):
    with pytest.raises(ValueError, match=r"images\[1\] is on cuda"):
        light_model([torch.rand(3, 64, 64), torch.rand(3, 64, 64, device="cuda")])


def test_training_without_targets_is_refused(train_model):
    with pytest.raises(ValueError, match="targets are needed in training mode"):
        train_model([torch.rand(3, 64, 64)])


def _target(**changes):
    target = square_target(64, 80, (10, 10, 40, 50))
    target.update(changes)
    return {k: v for k, v in target.items() if v is not None}


@pytest.mark.parametrize(
    "targets, message",
    [
        ({"boxes": torch.zeros(0, 4)}, r"targets must be a list of 1 dicts"),
        ([_target(), _target()], r"targets must be a list of 1 dicts"),
        ([_target(masks=None)], r"targets\[0\] lacks \['masks'\]"),
        ([_target(labels=None, masks=None)], r"targets\[0\] lacks \['labels', 'masks'\]"),
        ([_target(boxes=torch.tensor([[10, 10, 40, 50]]))], r"targets\[0\]\['boxes'\] must be a float Tensor\[N, 4\], got torch.int64"),
        ([_target(boxes=torch.tensor([10.0, 10.0, 40.0, 50.0]))], r"targets\[0\]\['boxes'\] must be a float Tensor\[N, 4\]"),
        ([_target(labels=torch.tensor([1], dtype=torch.int32))], r"targets\[0\]\['labels'\] must be an int64"),
        ([_target(boxes=torch.tensor([[10.0, 10.0, 10.0, 50.0]]))], r"targets\[0\]\['boxes'\]\[0\] = \[10.0, 10.0, 10.0, 50.0\] has no width or height"),
        ([_target(boxes=torch.tensor([[10.0, 50.0, 40.0, 10.0]]))], r"has no width or height"),
        ([_target(masks=torch.zeros(1, 80, 64, dtype=torch.uint8))], r"targets\[0\]\['masks'\] must have shape \(1, 64, 80\) \(N x H x W\), got \(1, 80, 64\)"),
        ([_target(masks=torch.zeros(2, 64, 80, dtype=torch.uint8))], r"\['masks'\] must have shape \(1, 64, 80\)"),
        ([_target(masks=torch.zeros(64, 80, dtype=torch.uint8))], r"\['masks'\] must have shape \(1, 64, 80\)"),
    ],
)
def test_bad_targets_are_refused(train_model, targets, message):
    with pytest.raises(ValueError, match=message):
        train_model([torch.rand(3, 64, 80)], targets)


@pytest.mark.parametrize("label", [4, -1])
def test_labels_out_of_range_are_refused(train_model, label):
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        train_model([torch.rand(3, 64, 80)], [_target(labels=torch.tensor([label]))])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_boxes_are_refused(train_model, bad):
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        train_model([torch.rand(3, 64, 80)], [_target(boxes=torch.tensor([[10.0, 10.0, bad, 50.0]]))])


# ------------------------------------------------------------------------------------------
# Checkpoints


def test_save_then_load(light_model, eval_images, detections):
    buffer = io.BytesIO()
    light_model.save(buffer)
    buffer.seek(0)
    _assert_same_detections(MaskRCNN.load(buffer)(eval_images), detections)


def _plain_types(value, where="checkpoint"):
    """Every leaf of a checkpoint, as (path, type): only plain data and tensors may be there."""
    if type(value) is dict:
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            yield from _plain_types(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            yield from _plain_types(item, f"{where}[{i}]")
    else:
        yield where, type(value)


def test_checkpoint_holds_only_plain_data(light_model):
    buffer = io.BytesIO()
    light_model.save(buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)  # our own file: read it whole to look inside
    allowed = (str, int, float, bool, type(None), torch.Tensor, torch.nn.Parameter)
    strange = [(where, kind) for where, kind in _plain_types(state) if kind not in allowed]
    assert not strange


def _assert_same_detections(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in ("boxes", "labels", "scores", "areas"):
            assert torch.equal(x[key], y[key]), key
        assert x["masks"] == y["masks"]


def test_save_and_load_give_the_same_model(light_model, eval_images, detections, tmp_path):
    path = tmp_path / "light.pt"
    light_model.save(path, epoch=3)
    loaded = MaskRCNN.load(path)
    assert not loaded.training
    assert loaded.config == light_model.config
    assert loaded.class_names == CLASS_NAMES
    _assert_same_detections(loaded(eval_images), detections)
    # the file is plain data that torch's safe loader reads
    state = torch.load(path, weights_only=True)
    assert state["format"] == "maskray.checkpoint" and state["epoch"] == 3
    assert state["class_names"] == list(CLASS_NAMES)
    assert MaskRCNNConfig.from_dict(state["config"]) == light_model.config
    assert set(state["state_dict"]) == set(light_model.state_dict())
    assert set(state["versions"]) >= {"torch", "torchvision"}


def test_save_and_load_through_a_file_object(light_model):
    buffer = io.BytesIO()
    light_model.save(buffer)
    buffer.seek(0)
    loaded = MaskRCNN.load(buffer)
    assert loaded.config == light_model.config
    expected = light_model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_saving_a_channels_last_model_writes_contiguous_tensors(light_model, tmp_path):
    assert light_model.config.channels_last
    assert not light_model.backbone.body.layer1[0].conv1.weight.is_contiguous()  # the inference layout
    path = tmp_path / "light.pt"
    light_model.save(path)
    tensors = torch.load(path, weights_only=True)["state_dict"]
    assert tensors and all(t.is_contiguous() for t in tensors.values())
    assert all(t.device.type == "cpu" for t in tensors.values())


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted_checkpoint(path: Path, marker: Path, light_model) -> None:
    state = {"format": "maskray.checkpoint", "format_version": 1, "config": light_model.config.to_dict(), "payload": _Payload(marker)}
    torch.save(state, path)


def test_a_checkpoint_with_pickled_code_is_refused_unrun(light_model, tmp_path):
    # The control: loading the crafted file the unsafe way does run its code.
    control, control_marker = tmp_path / "control.pt", tmp_path / "control-ran"
    _crafted_checkpoint(control, control_marker, light_model)
    torch.load(control, weights_only=False)
    assert control_marker.exists()

    path, marker = tmp_path / "crafted.pt", tmp_path / "crafted-ran"
    _crafted_checkpoint(path, marker, light_model)
    with pytest.raises(ValueError, match="not a loadable weights file") as refused:
        MaskRCNN.load(path)
    assert str(path) in str(refused.value)
    with pytest.raises(ValueError) as refused:
        MaskRCNN.from_torchvision(path)
    assert str(path) in str(refused.value)
    assert not marker.exists()


def test_load_of_a_torchvision_state_dict_points_to_from_torchvision(torchvision_maskrcnn, tmp_path):
    path = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(torchvision_maskrcnn.state_dict(), path)
    with pytest.raises(ValueError, match="from_torchvision") as refused:
        MaskRCNN.load(path)
    assert str(path) in str(refused.value)
    # ... which reads the file
    model = MaskRCNN.from_torchvision(path)
    assert model.config.num_classes == 5
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, torchvision_maskrcnn.roi_heads.box_predictor.cls_score.weight)


def test_load_refuses_a_newer_format_and_a_missing_file(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": "maskray.checkpoint", "format_version": 99}, path)
    with pytest.raises(ValueError, match="format 99 is newer"):
        MaskRCNN.load(path)
    with pytest.raises(FileNotFoundError):
        MaskRCNN.load(tmp_path / "nowhere.pt")


def test_from_torchvision_refuses_other_state_dicts(tmp_path):
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ValueError, match="not a torchvision maskrcnn_resnet50_fpn state dict"):
        MaskRCNN.from_torchvision(resnet)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet, path)
    with pytest.raises(ValueError, match="not a torchvision maskrcnn_resnet50_fpn state dict") as refused:
        MaskRCNN.from_torchvision(path)
    assert str(path) in str(refused.value)
    with pytest.raises(ValueError, match="expected a state dict"):
        buffer = io.BytesIO()
        torch.save([1, 2, 3], buffer)
        buffer.seek(0)
        MaskRCNN.from_torchvision(buffer)
