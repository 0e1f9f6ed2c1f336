"""The CUDA kernels of csrc/cuda, run on the CPU, so that every index and every arithmetic step
of them executes where there is no GPU (CI).

tests/cuda_on_host/ext.cpp compiles csrc/cuda's host side (roi_*_launch.cuh: the checks,
layouts, buffers, dtype dispatch and grid size) and its per-thread bodies (roi_*_body.cuh)
with the host compiler, and runs every thread of the grid the GPU launch would have, one after
another, with the atomic adds as plain adds. Its results are compared with our CPU kernels (bit
for bit: the arithmetic is the same, and a serial walk of the scatter adds into each cell in
the CPU kernel's order) and with torchvision (to rounding). What this shows, and what it
cannot (races, occupancy, speed, the device compiler's code): the README's note on it.
"""

import contextlib
import os
import platform
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torchvision.ops
from conftest import (
    BOX_KINDS,
    FEATURE,
    OUTPUT_SIZE,
    ROI_ALIGN,
    TOLERANCE,
    is_channels_last,
    make_input,
    output_and_grad,
    random_like_output,
    random_rois,
)

import maskray.model.ops  # noqa: F401  (registers torch.ops.maskray, the CPU kernels)

pytestmark = pytest.mark.slow  # the extension's build: about a minute

# The grid cap of an H100 / H200 launch (132 SMs * 2048 / 256 resident blocks * 4), under which
# every test case here gets one thread per work item, and caps under which one or three blocks'
# grid-stride loops cover all items.
GPU_BLOCKS = 132 * (2048 // 256) * 4
GRIDS = {"gpu_grid": GPU_BLOCKS, "one_block": 1, "three_blocks": 3}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float64", "float16", "bfloat16"]
ALIGN_VARIANTS = [pytest.param(v, id="-".join(f"{k}={x}" for k, x in v.items())) for v in ROI_ALIGN.variants]
MAIN_ALIGN = ROI_ALIGN.main_variants[0]  # sampling_ratio=2, aligned=True

# The same compiler and flags give the same bits where the CPU has no fused multiply-add that
# the compiler could contract differently in the two builds (x86-64 without -mfma); elsewhere
# the host-run kernels must agree with the CPU's to rounding.
BITWISE = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """torch.ops.maskray_cuda_on_host, built for this session (a fresh folder: no stale lock)."""
    from torch.utils.cpp_extension import load

    root = Path(__file__).resolve().parent.parent
    # The build runs `ninja`, which pip installs next to the interpreter: on PATH only in an
    # activated environment (make runs .venv/bin/python directly).
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        load(
            "maskray_cuda_on_host",
            [str(root / "tests" / "cuda_on_host" / "ext.cpp")],
            extra_include_paths=[str(root / "csrc")],
            # -O1: a quick build, and the cases are small; no FMA contraction: IEEE order as written.
            extra_cflags=["-O1", "-g0", "-ffp-contract=off"],
            build_directory=str(tmp_path_factory.mktemp("cuda_on_host")),
            is_python_module=False,
        )
    finally:
        os.environ["PATH"] = path
    return torch.ops.maskray_cuda_on_host


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def assert_same(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit where BITWISE, else to rounding; and in the same layout."""
    if BITWISE:
        assert torch.equal(ours, expected), f"max difference {(ours.double() - expected.double()).abs().max()}"
    else:
        torch.testing.assert_close(ours, expected)
    assert ours.dtype == expected.dtype and ours.stride() == expected.stride()


# The ops of csrc/cuda run on the host, called as our autograd formulas call the CUDA ops.


def align_forward(host, x, rois, spatial_scale, extra, grid=GPU_BLOCKS, reverse=False):
    return host.roi_align(
        x, rois, spatial_scale, *OUTPUT_SIZE, extra["sampling_ratio"], extra["aligned"], grid, reverse
    )


def align_backward(host, grad, rois, x, spatial_scale, extra, grid=GPU_BLOCKS, reverse=False, deterministic=False):
    with deterministic_algorithms(deterministic):
        return host.roi_align_backward(
            grad, rois, spatial_scale, *OUTPUT_SIZE, *x.shape, extra["sampling_ratio"], extra["aligned"], grid, reverse
        )


def pool_forward(host, x, rois, spatial_scale, grid=GPU_BLOCKS, reverse=False):
    return host.roi_pool(x, rois, spatial_scale, *OUTPUT_SIZE, grid, reverse)


def pool_backward(host, grad, rois, argmax, x, grid=GPU_BLOCKS, reverse=False, deterministic=False):
    with deterministic_algorithms(deterministic):
        return host.roi_pool_backward(grad, rois, argmax, *OUTPUT_SIZE, *x.shape, grid, reverse)


# The CPU kernels and torchvision, the references.


def cpu_align(x, rois, spatial_scale, extra, grad):
    out = torch.ops.maskray.roi_align(x, rois, spatial_scale, *OUTPUT_SIZE, extra["sampling_ratio"], extra["aligned"])
    grad_input = torch.ops.maskray._roi_align_backward(
        grad, rois, spatial_scale, *OUTPUT_SIZE, *x.shape, extra["sampling_ratio"], extra["aligned"]
    )
    return out, grad_input


def cpu_pool(x, rois, spatial_scale, grad):
    out, argmax = torch.ops.maskray.roi_pool(x, rois, spatial_scale, *OUTPUT_SIZE)
    grad_input = torch.ops.maskray._roi_pool_backward(grad, rois, argmax, spatial_scale, *OUTPUT_SIZE, *x.shape)
    return out, argmax, grad_input


def assert_matches_torchvision(theirs, x, rois, grad, out, grad_input, **extra):
    """(out, grad_input) against torchvision's op and its autograd; half types against
    torchvision in float32 on the upcast values, to the dtype's precision."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    up = (lambda t: t.float()) if low else (lambda t: t)
    expected, expected_grad = output_and_grad(lambda t: theirs(t, up(rois), OUTPUT_SIZE, **extra), up(x), up(grad))
    tolerance = TOLERANCE.get(x.dtype, {})
    torch.testing.assert_close(up(out), expected, **tolerance)
    torch.testing.assert_close(up(grad_input), expected_grad, **tolerance)


def case(
    shape=FEATURE, layout="contiguous", dtype=torch.float32, n_boxes=24, scale=0.5, kinds=BOX_KINDS, seed=20240607
):
    g = torch.Generator().manual_seed(seed)
    x = make_input(shape, layout, g, dtype)
    rois = random_rois(shape[0], n_boxes, *shape[2:], scale, g, kinds, dtype=dtype)
    return x, rois, g


def assert_backwards(grads, expected_grad, launch):
    """The deterministic backward gives the CPU's bits on any grid; the scatter does where each
    thread takes one item and the threads are walked in item order (the CPU kernel's order of
    the adds into each cell), and agrees to rounding on any other grid or walk."""
    assert_same(grads[True], expected_grad)
    if launch:
        torch.testing.assert_close(grads[False], expected_grad)
        assert grads[False].stride() == expected_grad.stride()
    else:
        assert_same(grads[False], expected_grad)


def run_align(host, x, rois, g, scale, extra, grad_layout=None, **launch):
    """Host forward, and both host backwards, against the CPU kernels; returns them."""
    out = align_forward(host, x, rois, scale, extra, **launch)
    grad = random_like_output(out, g, grad_layout)
    expected_out, expected_grad = cpu_align(x, rois, scale, extra, grad)
    assert_same(out, expected_out)
    grads = {
        det: align_backward(host, grad, rois, x, scale, extra, deterministic=det, **launch) for det in (False, True)
    }
    assert_backwards(grads, expected_grad, launch)
    return out, grad, grads


def run_pool(host, x, rois, g, scale, grad_layout=None, **launch):
    out, argmax = pool_forward(host, x, rois, scale, **launch)
    grad = random_like_output(out, g, grad_layout)
    expected_out, expected_argmax, expected_grad = cpu_pool(x, rois, scale, grad)
    assert_same(out, expected_out)
    assert torch.equal(argmax, expected_argmax) and argmax.stride() == expected_argmax.stride()
    grads = {det: pool_backward(host, grad, rois, argmax, x, deterministic=det, **launch) for det in (False, True)}
    assert_backwards(grads, expected_grad, launch)
    return out, grad, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("extra", ALIGN_VARIANTS)
def test_roi_align(host, extra, layout, dtype):
    # Boxes of every kind (inside, partly outside, outside, degenerate) in random order.
    x, rois, g = case(layout=layout, dtype=dtype)
    out, grad, grads = run_align(host, x, rois, g, 0.5, extra)
    assert is_channels_last(out) == is_channels_last(grads[True]) == (layout == "channels_last")
    assert_matches_torchvision(ROI_ALIGN.theirs, x, rois, grad, out, grads[True], spatial_scale=0.5, **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_roi_pool(host, layout, dtype):
    x, rois, g = case(layout=layout, dtype=dtype)
    out, grad, grads = run_pool(host, x, rois, g, 0.5)
    assert is_channels_last(out) == is_channels_last(grads[True]) == (layout == "channels_last")
    assert_matches_torchvision(torchvision.ops.roi_pool, x, rois, grad, out, grads[True], spatial_scale=0.5)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("kind", BOX_KINDS)
@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 4])
def test_box_kind(host, kind, op, spatial_scale):
    x, rois, g = case(n_boxes=12, scale=spatial_scale, kinds=(kind,))
    if op == "roi_align":
        out, _, grads = run_align(host, x, rois, g, spatial_scale, MAIN_ALIGN)
    else:
        out, _, grads = run_pool(host, x, rois, g, spatial_scale)
    if kind == "outside":  # no sample or cell of these boxes is on the map
        assert not out.any() and not grads[False].any() and not grads[True].any()


def backward_of(host, op, x, rois, g, grid=GPU_BLOCKS, reverse=False):
    """(host output, CPU output, CPU gradient, backward(reverse, deterministic) on the host) of
    ``op`` on (x, rois) with a random upstream gradient; the forward runs on `grid`, walked
    in reverse if `reverse`."""
    if op == "roi_align":
        out = align_forward(host, x, rois, 0.5, MAIN_ALIGN, grid, reverse)
        grad = random_like_output(out, g)
        expected_out, expected_grad = cpu_align(x, rois, 0.5, MAIN_ALIGN, grad)

        def backward(reverse, deterministic):
            return align_backward(host, grad, rois, x, 0.5, MAIN_ALIGN, grid, reverse, deterministic)

    else:
        out, argmax = pool_forward(host, x, rois, 0.5, grid, reverse)
        grad = random_like_output(out, g)
        expected_out, _, expected_grad = cpu_pool(x, rois, 0.5, grad)

        def backward(reverse, deterministic):
            return pool_backward(host, grad, rois, argmax, x, grid, reverse, deterministic)

    return out, expected_out, expected_grad, backward


GRID_WALKS = [(1, False), (3, True), (GPU_BLOCKS, True)]


@pytest.mark.parametrize("grid, reverse", GRID_WALKS, ids=["one_block", "three_blocks_reversed", "gpu_grid_reversed"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_any_grid_and_walk(host, op, layout, grid, reverse):
    # The grid-stride loops: a grid smaller than the work (each thread takes many items), and
    # the threads walked in reverse, an order a GPU may run them in too. The forward and the
    # deterministic backward give the CPU's bits whatever the grid and order; the scatter gives
    # them to rounding only (another order of the adds into a cell).
    x, rois, g = case(shape=(2, 40, 13, 17), layout=layout, n_boxes=32)
    out, expected_out, expected_grad, backward = backward_of(host, op, x, rois, g, grid, reverse)
    assert_same(out, expected_out)
    assert_same(backward(reverse, True), expected_grad)
    torch.testing.assert_close(backward(reverse, False), expected_grad)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_scatter_order_shows_and_gather_order_does_not(host, op):
    # The test above has teeth: with many rois adding into each cell, walking the scatter's
    # threads in reverse changes the bits of some cells (what atomics do from run to run on a
    # GPU), while the deterministic backward gives the same bits under any walk.
    x, rois, g = case(shape=(2, 8, 13, 17), n_boxes=96)
    _, _, _, backward = backward_of(host, op, x, rois, g, grid=3)
    assert not torch.equal(backward(False, False), backward(True, False))
    assert torch.equal(backward(False, True), backward(True, True))


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_grad_strides(host, layout, grad_layout):
    # The backward reads grad through its strides, whatever they are, and grad_input follows
    # grad's layout (channels_last or contiguous).
    x, rois, g = case(layout=layout)
    for op in ("roi_align", "roi_pool"):
        if op == "roi_align":
            out = align_forward(host, x, rois, 0.5, MAIN_ALIGN)
        else:
            out, argmax = pool_forward(host, x, rois, 0.5)
        grad = random_like_output(
            out, g, torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format
        )
        if grad_layout == "sliced":
            grad = torch.cat([grad, grad], dim=1)[:, ::2]
        for det in (False, True):
            if op == "roi_align":
                ours = align_backward(host, grad, rois, x, 0.5, MAIN_ALIGN, deterministic=det)
                expected = cpu_align(x, rois, 0.5, MAIN_ALIGN, grad)[1]
            else:
                ours = pool_backward(host, grad, rois, argmax, x, deterministic=det)
                expected = cpu_pool(x, rois, 0.5, grad)[2]
            assert_same(ours, expected)
            assert is_channels_last(ours) == (grad_layout == "channels_last")


@pytest.mark.parametrize("form", ["no_rois", "image_without_rois", "empty_map"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty(host, form, layout):
    # No rois (nothing to launch), an image of the batch that no roi names (its gradient is
    # zero), and a map without cells (zeros, never a read of cell -1).
    shape = {"no_rois": FEATURE, "image_without_rois": (3, *FEATURE[1:]), "empty_map": (2, 3, 0, 5)}[form]
    x, rois, g = case(shape=shape, layout=layout, n_boxes=0 if form == "no_rois" else 18)
    if form == "image_without_rois":
        rois = rois[rois[:, 0] != 1]
    _, _, grads = run_align(host, x, rois, g, 0.5, MAIN_ALIGN)
    run_pool(host, x, rois, g, 0.5)
    if form == "image_without_rois":
        assert not grads[True][1].any()
        assert grads[True][[0, 2]].any()


@pytest.mark.parametrize("sampling_ratio", [-1, 0])
def test_boxes_reversed_by_a_bin(host, sampling_ratio):
    # aligned=True keeps a reversed box reversed; adaptive sampling then gives it no samples
    # along that axis: its bins are 0 and pass no gradient (torchvision's CUDA kernel agrees).
    x, _, g = case()
    rois = torch.tensor([[0, 2.0, 9.0, 12.0, 1.0], [1, 14.0, 1.5, 3.0, 11.0], [0, 1.0, 1.0, 9.0, 7.0]])
    extra = {"sampling_ratio": sampling_ratio, "aligned": True}
    out, _, _ = run_align(host, x, rois, g, 1.0, extra)
    assert not out[:2].any() and out[2].any()


def test_feature_pyramid_sized(host):
    # A larger map and more rois, adaptive sampling (bins of many samples), channels_last, on
    # a grid of three blocks: each thread walks hundreds of items.
    x, rois, g = case(shape=(2, 16, 50, 68), layout="channels_last", n_boxes=64, scale=0.25, seed=7)
    run_align(host, x, rois, g, 0.25, {"sampling_ratio": -1, "aligned": False}, grid=3)
    run_pool(host, x, rois, g, 0.25, grid=3)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_bad_batch_index_is_refused(host, op):
    # The host side checks the values before any thread runs (on the GPU: before the launch).
    x, rois, _ = case()
    rois[1, 0] = 2.0
    with pytest.raises(RuntimeError, match=rf"{op}: rois\[1, 0\] = 2 is not a batch index"):
        align_forward(host, x, rois, 0.5, MAIN_ALIGN) if op == "roi_align" else pool_forward(host, x, rois, 0.5)
