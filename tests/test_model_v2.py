"""The v2 architecture (torchvision's maskrcnn_resnet50_fpn_v2 and fasterrcnn_resnet50_fpn_v2)
against torchvision's own builders, with the same weights and images, as test_model_parity does
for v1: BatchNorm in the trunk, the FPN and both heads, a two-conv RPN head, a 4conv1fc box head.

Reference weights: tests/torchvision_reference.py (seeded, every BatchNorm calibrated). Two
small images at min_size 320 and 300 proposals per image keep each forward pass to seconds.
"""

import io

import pytest
import torch

from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.model.box_head import ConvFCBoxHead
from maskray.model.resnet import BatchNorm2d
from tests.test_model_parity import (
    as_float,
    assert_same_losses_and_gradients,
    dense_rle,
    masks_mostly_agree,
    match_detections,
    mismatched_pixels,
)
from tests.torchvision_reference import calibrated_state_dict_v2, torchvision_model_v2

SCORE_THRESH = 0.5  # 67 and 54 detections on these weights and images: many, but under the cap
TORCHVISION_SETTINGS = {"min_size": 320, "max_size": 512, "rpn_post_nms_top_n_test": 300, "box_score_thresh": SCORE_THRESH}
SETTINGS = {"min_size": (320,), "max_size": 512, "rpn_post_nms_top_n_test": 300, "box_score_thresh": SCORE_THRESH}
EXACT = {"channels_last": False, "fold_batchnorm": False}


@pytest.fixture(scope="module")
def weights():
    return calibrated_state_dict_v2(seed=0)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(5)
    return [
        (torch.rand(3, 240, 320, generator=generator) * 255).to(torch.uint8),
        torch.rand(3, 331, 247, generator=generator),
    ]


@pytest.fixture(scope="module")
def torchvision_detections(weights, images):
    reference = torchvision_model_v2(**TORCHVISION_SETTINGS)
    reference.load_state_dict(weights)
    with torch.inference_mode():
        return reference.eval()(as_float(images))


@pytest.fixture(scope="module")
def fast_model(weights):
    """The default inference path (channels_last, every BatchNorm folded), from torchvision's weights."""
    return MaskRCNN.from_torchvision(weights, config=MaskRCNNConfig.resnet50_fpn_v2(**SETTINGS))


@pytest.fixture(scope="module")
def fast_run(fast_model, images):
    """The fast model's detections, and how often a BatchNorm module ran unfolded meanwhile."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in fast_model.modules() if isinstance(m, BatchNorm2d)]
    try:
        detections = fast_model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return detections, len(calls)


def test_v2_preset_is_torchvisions_architecture(weights):
    """Every key and shape of torchvision's v2, and the parts its builder chooses."""
    model = MaskRCNN(MaskRCNNConfig.resnet50_fpn_v2())
    ours = model.state_dict()
    assert list(ours) == list(weights)  # the same names, in the same order
    assert all(ours[k].shape == v.shape for k, v in weights.items())
    assert len(model.rpn.head.conv) == 2
    assert isinstance(model.roi_heads.box_head, ConvFCBoxHead) and model.roi_heads.box_head.out_features == 1024
    norms = [name for name, m in model.named_modules() if isinstance(m, BatchNorm2d)]
    assert sum(n.startswith("backbone.body.") for n in norms) == 53  # the whole trunk: trainable BatchNorm
    assert sum(n.startswith("backbone.fpn.") for n in norms) == 8
    assert sum(n.startswith("roi_heads.box_head.") for n in norms) == 4
    assert sum(n.startswith("roi_heads.mask_head.") for n in norms) == 4
    # torchvision's default for trained weights: layer2..layer4 train, the stem and layer1 do not
    trainable = {n.split(".")[2] for n, p in model.backbone.body.named_parameters(prefix="backbone.body") if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_eval_matches_torchvision_exactly_in_its_layout(weights, images, torchvision_detections):
    """channels_last and BatchNorm folding off: the same float ops as torchvision's v2."""
    model = MaskRCNN.from_torchvision(weights, config=MaskRCNNConfig.resnet50_fpn_v2(**SETTINGS, **EXACT))
    total = 0
    for mine, reference in zip(model(images), torchvision_detections):
        assert len(mine["boxes"]) == len(reference["boxes"]) < 100
        total += len(mine["boxes"])
        torch.testing.assert_close(mine["boxes"], reference["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(mine["scores"], reference["scores"], atol=1e-6, rtol=0)
        assert torch.equal(mine["labels"], reference["labels"])
        # The detected class's mask logits are a dot product here, a 1x1 conv there: a pixel
        # exactly at the threshold may round the other way.
        for ours_rle, reference_rle in zip(mine["masks"], dense_rle(reference["masks"])):
            assert ours_rle["size"] == reference_rle["size"]
            assert mismatched_pixels(ours_rle, reference_rle) <= 3
    assert total >= 60, "too few detections to compare; the reference weights changed?"


def test_eval_fast_path_gives_the_same_detections(images, torchvision_detections, fast_run):
    """channels_last and every BatchNorm folded (trunk, FPN, box head, mask head): rounding only."""
    detections, unfolded_calls = fast_run
    assert unfolded_calls == 0  # no BatchNorm ran as itself: all were folded into their convs
    for mine, reference in zip(detections, torchvision_detections):
        assert len(mine["boxes"]) == len(reference["boxes"])
        # Near-tied scores may swap places, so each detection is matched to its counterpart.
        order = match_detections(mine, reference, box_tol=0.05, score_tol=1e-3)
        assert masks_mostly_agree(mine["masks"], reference["masks"][order])


def test_train_losses_match_torchvision(weights):
    """Train mode: batch statistics in every BatchNorm, the same samples, the same losses and gradients."""
    reference = torchvision_model_v2(min_size=320, max_size=512)
    reference.load_state_dict(weights)
    mine = MaskRCNN(MaskRCNNConfig.resnet50_fpn_v2(min_size=(320,), max_size=512))
    mine.load_state_dict(weights)
    checked = assert_same_losses_and_gradients(mine, reference,
                                               ("rpn.", "roi_heads.", "backbone.fpn.", "backbone.body.layer4."))
    # BatchNorm weights of the trunk, the FPN and both heads among them
    for name in ("backbone.body.layer4.2.bn3.weight", "backbone.fpn.layer_blocks.0.1.weight",
                 "roi_heads.box_head.3.1.weight", "roi_heads.mask_head.3.1.weight", "rpn.head.conv.1.0.weight"):
        assert name in checked, name
    # ... and the running statistics moved alike
    torch.testing.assert_close(mine.state_dict()["roi_heads.box_head.0.1.running_mean"],
                               reference.state_dict()["roi_heads.box_head.0.1.running_mean"], rtol=1e-5, atol=1e-6)


def test_faster_rcnn_v2_matches_torchvision(weights, images):
    """fasterrcnn_resnet50_fpn_v2: from_torchvision sees no mask head and builds none."""
    box_weights = {k: v for k, v in weights.items() if not k.startswith(("roi_heads.mask_head", "roi_heads.mask_predictor"))}
    reference = torchvision_model_v2(mask=False, **TORCHVISION_SETTINGS)
    reference.load_state_dict(box_weights)
    with torch.inference_mode():
        expected = reference.eval()(as_float(images))
    picked = MaskRCNN.from_torchvision(box_weights).config
    assert picked == MaskRCNNConfig.resnet50_fpn_v2(91, picked.class_names, mask=False)
    model = MaskRCNN.from_torchvision(box_weights, config=MaskRCNNConfig.resnet50_fpn_v2(mask=False, **SETTINGS, **EXACT))
    assert model.roi_heads.mask_head is None
    for mine, reference_detection in zip(model(images), expected):
        assert "masks" not in mine and len(mine["boxes"]) == len(reference_detection["boxes"]) > 0
        torch.testing.assert_close(mine["boxes"], reference_detection["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(mine["scores"], reference_detection["scores"], atol=1e-6, rtol=0)
        assert torch.equal(mine["labels"], reference_detection["labels"])


def test_from_torchvision_picks_v2_from_the_keys(weights, tmp_path):
    path = tmp_path / "maskrcnn_v2.pth"
    torch.save(weights, path)
    model = MaskRCNN.from_torchvision(path)
    assert model.config == MaskRCNNConfig.resnet50_fpn_v2(91, model.class_names)
    assert model.class_names[1] == "person" and not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_from_torchvision_tells_v1_by_its_keys_old_names_included():
    """v1's state dict, with the names older torchvision saved it under (the public COCO_V1 file's):
    plain FPN convs, rpn.head.conv, mask_fcn1..4."""
    v1 = MaskRCNN(MaskRCNNConfig.resnet50_fpn()).state_dict()
    legacy = dict(v1)
    for blocks in ("inner_blocks", "layer_blocks"):
        for i in range(4):
            for kind in ("weight", "bias"):
                legacy[f"backbone.fpn.{blocks}.{i}.{kind}"] = legacy.pop(f"backbone.fpn.{blocks}.{i}.0.{kind}")
    for i in range(1, 5):
        for kind in ("weight", "bias"):
            legacy[f"roi_heads.mask_head.mask_fcn{i}.{kind}"] = legacy.pop(f"roi_heads.mask_head.{i - 1}.0.{kind}")
    for kind in ("weight", "bias"):
        legacy[f"rpn.head.conv.{kind}"] = legacy.pop(f"rpn.head.conv.0.0.{kind}")
    for state_dict in (v1, legacy):
        model = MaskRCNN.from_torchvision(state_dict)
        assert model.config == MaskRCNNConfig.resnet50_fpn(91, model.class_names)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in v1.items())


def test_weights_of_one_architecture_into_a_config_of_the_other_is_one_line(weights):
    with pytest.raises(ValueError) as refused:
        MaskRCNN.from_torchvision(weights, config=MaskRCNNConfig.resnet50_fpn())
    message = str(refused.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith("state dict: maskrcnn_resnet50_fpn_v2 weights, but the config builds other parts: "), message
    assert "rpn_head_convs=1 (the weights': 2)" in message and "resnet50_fpn_v2()" in message

    v1 = MaskRCNN(MaskRCNNConfig.resnet50_fpn(mask=False)).state_dict()
    buffer = io.BytesIO()
    torch.save(v1, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match=r"fasterrcnn_resnet50_fpn weights, .*box_head_convs=4 \(the weights': 0\)") as refused:
        MaskRCNN.from_torchvision(buffer, config=MaskRCNNConfig.resnet50_fpn_v2(mask=False))
    assert "\n" not in str(refused.value)


def test_v2_checkpoint_saves_and_loads_with_equal_outputs(fast_model, fast_run, images, tmp_path):
    path = tmp_path / "v2.pt"
    fast_model.save(path)
    loaded = MaskRCNN.load(path)
    assert loaded.config == fast_model.config and not loaded.training
    state = loaded.state_dict()
    for key, value in fast_model.state_dict().items():
        assert torch.equal(state[key], value), key
    for mine, before in zip(loaded(images), fast_run[0]):
        assert torch.equal(mine["boxes"], before["boxes"]) and torch.equal(mine["scores"], before["scores"])
        assert torch.equal(mine["labels"], before["labels"]) and mine["masks"] == before["masks"]


def test_configs_saved_before_v2_load_as_v1():
    """A config dict without v2's fields (a checkpoint written before they existed) is v1's."""
    old = MaskRCNNConfig.resnet50_fpn().to_dict()
    for field in ("fpn_norm", "rpn_head_convs", "box_head_convs", "box_head_channels", "head_norm"):
        old.pop(field)
    config = MaskRCNNConfig.from_dict(old)
    assert config == MaskRCNNConfig.resnet50_fpn()
    assert (config.fpn_norm, config.rpn_head_convs, config.box_head_convs, config.head_norm) == ("none", 1, 0, "none")
    v2 = MaskRCNNConfig.resnet50_fpn_v2()
    assert MaskRCNNConfig.from_dict(v2.to_dict()) == v2
    assert (v2.backbone_norm, v2.trainable_backbone_layers, v2.fpn_norm, v2.head_norm) == ("batch", 3, "batch", "batch")
    assert (v2.rpn_head_convs, v2.box_head_convs, v2.box_head_channels, v2.representation_size) == (2, 4, 256, 1024)


@pytest.mark.parametrize("field, value", [("fpn_norm", "group"), ("head_norm", "frozen"), ("rpn_head_convs", 0),
                                          ("box_head_convs", -1), ("box_head_channels", 0)])
def test_v2_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"MaskRCNNConfig\.{field}\b"):
        MaskRCNNConfig.resnet50_fpn_v2(**{field: value})


def test_light_model_with_v2_parts_runs_and_folds():
    """The v2 parts on a small model (what a CPU test or a from-scratch run would build): the
    folded inference path equals the unfolded one to rounding."""
    torch.manual_seed(0)
    config = MaskRCNNConfig.light(num_classes=3, min_size=(128,), max_size=160, backbone_norm="batch",
                                  trainable_backbone_layers=5, fpn_norm="batch", rpn_head_convs=2, box_head_convs=2,
                                  box_head_channels=64, head_norm="batch", box_score_thresh=0.0)
    model = MaskRCNN(config)
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 120, 150, generator=generator)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 80.0, 90.0]]), "labels": torch.tensor([1]),
                "masks": torch.ones(1, 120, 150, dtype=torch.uint8)}]
    for _ in range(1):  # running statistics away from their init, so that folding has something to fold
        sum(model.train()(images, targets).values()).backward()
    exact = MaskRCNN(config.replace(**EXACT))
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        features = model.eval().to_inference_layout().backbone(images[0][None].contiguous(memory_format=torch.channels_last))
        expected = exact.eval().backbone(images[0][None])
    assert all(m._folded is not None for m in model.backbone.fpn.modules() if isinstance(m, BatchNorm2d))
    for key in expected:
        torch.testing.assert_close(features[key], expected[key], rtol=1e-4, atol=1e-4)
    result = model(images)[0]
    assert len(result["masks"]) == len(result["boxes"]) > 0
