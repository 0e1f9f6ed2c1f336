"""The CUDA kernels: the whole shared contract (conftest.RoiOpContract) on the GPU, against
torchvision's CUDA ops, plus CUDA against our CPU kernels and what only a device shows.
Skipped without a CUDA device or without a build of the CUDA kernels."""

import contextlib

import pytest
import torch
import torchvision.ops
from conftest import (
    FEATURE,
    FPN_IMAGE_SHAPES,
    OUTPUT_SIZE,
    ROI_ALIGN,
    ROI_POOL,
    RoiOpContract,
    assert_agree,
    fpn_boxes,
    fpn_features,
    make_input,
    output_and_grad,
    random_like_output,
    random_rois,
    requires_cuda,
)

from maskray.model.ops import MultiScaleRoIAlign

pytestmark = [pytest.mark.cuda, requires_cuda]

OPS = [
    pytest.param(op, extra, id=f"{op.name}-{'-'.join(f'{k}={v}' for k, v in extra.items()) or 'plain'}")
    for op in (ROI_ALIGN, ROI_POOL)
    for extra in op.main_variants
]


class TestRoIAlignCuda(RoiOpContract):
    op = ROI_ALIGN
    device = "cuda"


class TestRoIPoolCuda(RoiOpContract):
    op = ROI_POOL
    device = "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op, extra", OPS)
def test_cuda_matches_cpu(op, extra, layout, dtype, generator):
    x = make_input(FEATURE, layout, generator, dtype)
    rois = random_rois(FEATURE[0], 32, *FEATURE[2:], 0.5, generator, dtype=dtype)
    on_cpu = op.pair(rois, OUTPUT_SIZE, 0.5, **extra)[0]
    on_cuda = op.pair(rois.cuda(), OUTPUT_SIZE, 0.5, **extra)[0]
    assert_agree(on_cpu, on_cuda, x, generator, convert=lambda t: t.cuda())


@pytest.mark.parametrize("sampling_ratio", [-1, 0])
def test_box_reversed_by_a_bin_matches_torchvision_cuda(sampling_ratio, generator):
    # torchvision's CPU kernel raises on these boxes (see test_roi_align.py); its CUDA kernel is the oracle.
    x = make_input(FEATURE, generator=generator)
    rois = torch.tensor([[0, 2.0, 9.0, 12.0, 1.0], [1, 14.0, 1.5, 3.0, 11.0], [0, 1.0, 1.0, 9.0, 7.0]])
    expected = torchvision.ops.roi_align(x.cuda(), rois.cuda(), OUTPUT_SIZE, 1.0, sampling_ratio, True)
    for device in ("cpu", "cuda"):
        out = ROI_ALIGN.ours(x.to(device), rois.to(device), OUTPUT_SIZE, 1.0, sampling_ratio, True)
        torch.testing.assert_close(out.cuda(), expected)


@pytest.mark.parametrize("op, extra", OPS)
def test_devices_differ(op, extra):
    x, rois = torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([[0.0, 1, 1, 5, 5]])
    with pytest.raises(ValueError, match=f"{op.name}: boxes are on cpu but input is on cuda"):
        op.ours(x, rois, 2, **extra)
    with pytest.raises(RuntimeError, match=f"{op.name}: input and rois must be on the same device"):
        op.raw(*op.raw_args(x, rois, 1.0, (2, 2), **extra))


@pytest.mark.parametrize("op, extra", OPS)
def test_bad_batch_index_leaves_the_device_usable(op, extra):
    # The index check must stop the kernel before it reads out of bounds: an illegal memory
    # access would poison the CUDA context, and the next call would fail.
    x = torch.randn(2, 3, 8, 8, device="cuda")
    good = torch.tensor([[1.0, 1, 1, 5, 5]], device="cuda")
    with pytest.raises(RuntimeError, match="is not a batch index"):
        op.ours(x, torch.tensor([[2.0, 1, 1, 5, 5]], device="cuda"), 2, **extra)
    torch.testing.assert_close(op.ours(x, good, 2, **extra), op.theirs(x, good, 2, **extra))
    torch.cuda.synchronize()


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_multiscale_roi_align_cuda(sampling_ratio, generator):
    features = fpn_features(generator, device="cuda")
    boxes = [b.cuda() for b in fpn_boxes(generator)]
    names = ["0", "1", "2", "3"]
    out = MultiScaleRoIAlign(names, 7, sampling_ratio)(features, boxes, FPN_IMAGE_SHAPES)
    expected = torchvision.ops.MultiScaleRoIAlign(names, 7, sampling_ratio)(features, boxes, FPN_IMAGE_SHAPES)
    torch.testing.assert_close(out, expected)


@contextlib.contextmanager
def _deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op, extra", OPS)
def test_deterministic_backward(op, extra, layout, generator):
    # Under torch.use_deterministic_algorithms(True) the CUDA backward gathers each row of
    # grad_input in one fixed order instead of scattering with atomics: bit-identical gradients
    # run to run, and the CPU's gradient to rounding (the GPU fuses multiply-adds). Many rois on
    # a small map, so that each cell receives many adds, whose order atomics would vary.
    x = make_input((2, 40, *FEATURE[2:]), layout, generator).cuda()
    rois = random_rois(FEATURE[0], 256, *FEATURE[2:], 0.5, generator).cuda()
    fn = op.pair(rois, OUTPUT_SIZE, 0.5, **extra)[0]
    grad_output = random_like_output(fn(x), generator)
    with _deterministic_algorithms():
        grads = [output_and_grad(fn, x, grad_output)[1] for _ in range(3)]
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0])
    cpu_fn = op.pair(rois.cpu(), OUTPUT_SIZE, 0.5, **extra)[0]
    _, expected = output_and_grad(cpu_fn, x.cpu(), grad_output.cpu())
    torch.testing.assert_close(grads[0].cpu(), expected)
    assert grads[0].stride() == expected.stride()
