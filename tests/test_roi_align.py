"""maskray.model.ops.roi_align against torchvision.ops.roi_align: the shared contract (conftest.py)
over every sampling_ratio and both pixel models, and what is RoIAlign's own."""

import pytest
import torch
import torchvision.ops
from conftest import (
    FEATURE,
    OUTPUT_SIZE,
    ROI_ALIGN,
    RoiOpContract,
    assert_agree,
    make_input,
    output_and_grad,
    random_rois,
)

import maskray.model.ops


class TestRoIAlign(RoiOpContract):
    op = ROI_ALIGN


@pytest.mark.parametrize("sampling_ratio", [-1, 0])
def test_box_reversed_by_a_bin_pools_nothing(sampling_ratio, generator):
    # aligned=True keeps a reversed box reversed, and adaptive sampling gives it ceil(negative
    # bin size) <= 0 samples along that axis: no samples, so its bins are 0 and pass no gradient.
    # torchvision's CPU kernel raises on such a box (a negative vector size); its CUDA kernel
    # returns 0 too, and test_ops_cuda.py compares with that.
    x = make_input(FEATURE, generator=generator)
    rois = torch.tensor([[0, 2.0, 9.0, 12.0, 1.0], [1, 14.0, 1.5, 3.0, 11.0]])  # y reversed; x reversed
    grad_output = x.new_ones(2, FEATURE[1], *OUTPUT_SIZE)
    out, grad = output_and_grad(lambda t: maskray.model.ops.roi_align(t, rois, OUTPUT_SIZE, 1.0, sampling_ratio, True), x, grad_output)
    assert not out.any()
    assert not grad.any()


def test_module_matches_torchvision_module(generator):
    x = make_input(FEATURE, generator=generator)
    rois = random_rois(FEATURE[0], 12, *FEATURE[2:], 0.25, generator)
    ours = maskray.model.ops.RoIAlign((2, 5), 0.25, sampling_ratio=3, aligned=True)
    theirs = torchvision.ops.RoIAlign((2, 5), 0.25, sampling_ratio=3, aligned=True)
    torch.testing.assert_close(ours(x, rois), theirs(x, rois))
    assert "sampling_ratio=3, aligned=True" in repr(ours)


@pytest.mark.slow
def test_inductor_matches_eager(generator):
    # One inductor compile (it generates and builds C++, some seconds), forward and backward.
    def f(x, rois):
        return maskray.model.ops.roi_align(x, rois, OUTPUT_SIZE, 0.5, 2, True).sin()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    x, rois = make_input(FEATURE, generator=generator), random_rois(FEATURE[0], 16, *FEATURE[2:], 0.5, generator)
    assert_agree(lambda t: compiled(t, rois), lambda t: f(t, rois), x, generator)


def test_huge_box_with_adaptive_sampling_is_refused(generator):
    # One sample per cell of a box a billion cells wide would exhaust memory; the error says
    # what to do instead. A fixed sampling_ratio pools the same box (to zeros, off the map).
    x = make_input(FEATURE, generator=generator)
    rois = torch.tensor([[0, 0.0, 0.0, 1e9, 4.0]])
    with pytest.raises(RuntimeError, match=r"rois\[0\] spans .* pass a sampling_ratio > 0"):
        maskray.model.ops.roi_align(x, rois, OUTPUT_SIZE, 1.0, -1)
    out = maskray.model.ops.roi_align(x, rois, OUTPUT_SIZE, 1.0, 2)
    torch.testing.assert_close(out, torchvision.ops.roi_align(x, rois, OUTPUT_SIZE, 1.0, 2))
