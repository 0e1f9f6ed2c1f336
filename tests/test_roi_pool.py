"""maskray.model.ops.roi_pool against torchvision.ops.roi_pool: the shared contract (conftest.py)
and what is RoIPool's own (argmax, ties, exact half precision)."""

import pytest
import torch
import torchvision.ops
from conftest import FEATURE, OUTPUT_SIZE, ROI_POOL, RoiOpContract, make_input, random_rois

import maskray.model.ops


class TestRoIPool(RoiOpContract):
    op = ROI_POOL


def rois(generator, scale=1.0):
    return random_rois(FEATURE[0], 24, *FEATURE[2:], scale, generator)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_argmax_matches_torchvision(layout, generator):
    x, r = make_input(FEATURE, layout, generator), rois(generator, 0.5)
    out, argmax = torch.ops.maskray.roi_pool(x, r, 0.5, *OUTPUT_SIZE)
    expected, expected_argmax = torch.ops.torchvision.roi_pool(x, r, 0.5, *OUTPUT_SIZE)
    assert argmax.dtype == torch.int32
    assert torch.equal(out, expected)
    assert torch.equal(argmax, expected_argmax)  # -1 for empty bins in both


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties_pick_the_first_maximum(layout, generator):
    # Three values only: most bins hold several maxima; the gradient must reach the first, as torchvision's.
    x = torch.randint(0, 3, FEATURE, generator=generator).float()
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    r = rois(generator)
    _, argmax = torch.ops.maskray.roi_pool(x, r, 1.0, *OUTPUT_SIZE)
    assert torch.equal(argmax, torch.ops.torchvision.roi_pool(x, r, 1.0, *OUTPUT_SIZE)[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_forward_is_exact(dtype, generator):
    # A max selects a value: no rounding, so equal to float32 on the upcast values bit for bit.
    x, r = make_input(FEATURE, generator=generator, dtype=dtype), rois(generator).to(dtype)
    out = maskray.model.ops.roi_pool(x, r, OUTPUT_SIZE)
    assert out.dtype == dtype
    assert torch.equal(out.float(), torchvision.ops.roi_pool(x.float(), r.float(), OUTPUT_SIZE))


def test_module_matches_torchvision_module(generator):
    x, r = make_input(FEATURE, generator=generator), rois(generator, 0.25)
    ours, theirs = maskray.model.ops.RoIPool((2, 5), 0.25), torchvision.ops.RoIPool((2, 5), 0.25)
    torch.testing.assert_close(ours(x, r), theirs(x, r))
    assert "output_size=(2, 5), spatial_scale=0.25" in repr(ours)
