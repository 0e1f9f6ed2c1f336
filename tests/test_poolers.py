"""MultiScaleRoIAlign / MultiScaleRoIPool over FPN levels, against torchvision's
MultiScaleRoIAlign and against pooling each box at the level torchvision's LevelMapper picks."""

import pytest
import torch
import torchvision.ops
from conftest import FPN_IMAGE_SHAPES, fpn_boxes, fpn_features, pool_per_level, random_like_output

from maskray.model.ops import MultiScaleRoIAlign, MultiScaleRoIPool
from maskray.model.ops.poolers import fpn_levels

NAMES = ["0", "1", "2", "3"]


def output_and_grads(pooler, features, boxes, generator) -> tuple[torch.Tensor, dict]:
    """pooler(features) and the gradient of each feature (None for one the pooler did not use)
    under a random grad_output drawn from ``generator`` (same seed, same draw for each call)."""
    leaves = {name: f.detach().requires_grad_() for name, f in features.items()}
    out = pooler(leaves, boxes, FPN_IMAGE_SHAPES)
    grads = torch.autograd.grad(out, list(leaves.values()), random_like_output(out, generator), allow_unused=True)
    return out.detach(), dict(zip(leaves, grads))


def assert_same_pooling(ours, theirs, features, boxes, seed: int = 7):
    out, grads = output_and_grads(ours, features, boxes, torch.Generator().manual_seed(seed))
    expected, expected_grads = output_and_grads(theirs, features, boxes, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out, expected)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        if expected_grads[name] is None:
            assert grad is None, f"level {name!r} is not pooled from, yet has a gradient"
        else:
            torch.testing.assert_close(grad, expected_grads[name], msg=f"gradient of level {name!r}")


def test_boxes_reach_every_level(generator):
    # The other tests only mean something if the boxes spread over all four levels.
    scales, mapper = torchvision.ops.poolers._setup_scales(
        [f for n, f in fpn_features(generator).items() if n in NAMES], FPN_IMAGE_SHAPES, 224, 4
    )
    assert scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert set(mapper(fpn_boxes(generator)).tolist()) == {0, 1, 2, 3}


def test_fpn_levels_match_level_mapper(generator):
    boxes = fpn_boxes(generator)
    mapper = torchvision.ops.poolers.LevelMapper(2, 5)
    assert torch.equal(fpn_levels(boxes, 2, 5, 224, 4), mapper(boxes))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_multiscale_roi_align_matches_torchvision(sampling_ratio, layout, generator):
    features, boxes = fpn_features(generator, layout=layout), fpn_boxes(generator)
    ours = MultiScaleRoIAlign(NAMES, 7, sampling_ratio)
    theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, 7, sampling_ratio)
    assert_same_pooling(ours, theirs, features, boxes)


@pytest.mark.parametrize("names", [["1"], ["pool"]], ids=["level_1", "pool_only"])
def test_single_level(names, generator):
    features, boxes = fpn_features(generator), fpn_boxes(generator)
    ours = MultiScaleRoIAlign(names, (3, 5), 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, (3, 5), 2)
    assert_same_pooling(ours, theirs, features, boxes)


def test_image_without_boxes(generator):
    features, boxes = fpn_features(generator), fpn_boxes(generator)
    boxes[0] = boxes[0][:0]
    assert_same_pooling(MultiScaleRoIAlign(NAMES, 7, 2), torchvision.ops.MultiScaleRoIAlign(NAMES, 7, 2), features, boxes)


def test_multiscale_roi_align_aligned_matches_per_level(generator):
    # torchvision's MultiScaleRoIAlign has no `aligned`: the oracle pools each level itself.
    features, boxes = fpn_features(generator), fpn_boxes(generator)
    ours = MultiScaleRoIAlign(NAMES, (4, 6), 2, aligned=True)

    def theirs(feats, bxs, _shapes):
        return pool_per_level(torchvision.ops.roi_align, feats, NAMES, bxs, (4, 6), sampling_ratio=2, aligned=True)

    assert_same_pooling(ours, theirs, features, boxes)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_multiscale_roi_pool_matches_per_level(layout, generator):
    features, boxes = fpn_features(generator, layout=layout), fpn_boxes(generator)

    def theirs(feats, bxs, _shapes):
        return pool_per_level(torchvision.ops.roi_pool, feats, NAMES, bxs, (7, 7))

    assert_same_pooling(MultiScaleRoIPool(NAMES, 7), theirs, features, boxes)


@pytest.mark.parametrize("pooler", [MultiScaleRoIAlign, MultiScaleRoIPool])
def test_missing_feature_raises_key_error(pooler, generator):
    features = fpn_features(generator)
    del features["2"]
    extra = {"sampling_ratio": 2} if pooler is MultiScaleRoIAlign else {}
    with pytest.raises(KeyError, match=r"feature maps \['2'\] are missing"):
        pooler(NAMES, 7, **extra)(features, fpn_boxes(generator), FPN_IMAGE_SHAPES)


@pytest.mark.parametrize("names", ["0", []], ids=["string", "empty"])
def test_featmap_names_must_be_a_non_empty_list(names):
    with pytest.raises(ValueError, match="featmap_names must be a non-empty list"):
        MultiScaleRoIPool(names, 7)
