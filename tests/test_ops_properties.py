"""Property tests: on any small shape, box set and option, both ops equal torchvision's."""

import torch
from conftest import ROI_ALIGN, ROI_POOL, assert_matches_torchvision, make_input
from hypothesis import assume, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def roi_cases(draw):
    """(input, rois, output_size, spatial_scale): batch 1-3, channels 1-5, H and W 1-20, both
    layouts, 0-6 boxes with float corners anywhere from half a map before it to half past it
    (so also outside, degenerate and reversed)."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    layout = draw(st.sampled_from(["contiguous", "channels_last"]))
    x = make_input((n, c, h, w), layout, torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1))))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25]))

    def coordinate(size):
        return st.floats(-0.5 * size / scale, 1.5 * size / scale, width=32)

    box = st.tuples(st.integers(0, n - 1), coordinate(w), coordinate(h), coordinate(w), coordinate(h))
    rois = torch.tensor(draw(st.lists(box, max_size=6)), dtype=torch.float32).reshape(-1, 5)
    output_size = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    return x, rois, output_size, scale


def torchvision_cpu_fails(rois, output_size, scale, sampling_ratio, aligned) -> bool:
    """torchvision's CPU roi_align raises (a negative std::vector size) on an aligned box
    reversed by a bin or more on one axis only, with adaptive sampling: ceil(bin size) is a
    negative grid. Mirrors its float32 arithmetic; test_roi_align.py covers such boxes."""
    if not aligned or sampling_ratio > 0 or rois.numel() == 0:
        return False
    start, end = rois[:, 1:3] * scale - 0.5, rois[:, 3:5] * scale - 0.5
    negative = torch.ceil((end - start) / torch.tensor(output_size[::-1])) < 0
    return bool((negative[:, 0] != negative[:, 1]).any())


def check(op, case, **extra):
    x, rois, output_size, scale = case
    # A contiguous grad_output: the grad_output's own layout has its tests in test_roi_*.py.
    out, _ = assert_matches_torchvision(
        op, x, rois, output_size, scale, generator=torch.Generator().manual_seed(0), grad_layout=torch.contiguous_format, **extra
    )
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@SETTINGS
@given(case=roi_cases(), aligned=st.booleans(), sampling_ratio=st.integers(-1, 3))
def test_roi_align_matches_torchvision(case, aligned, sampling_ratio):
    assume(not torchvision_cpu_fails(*case[1:], sampling_ratio, aligned))
    check(ROI_ALIGN, case, sampling_ratio=sampling_ratio, aligned=aligned)


@SETTINGS
@given(case=roi_cases())
def test_roi_pool_matches_torchvision(case):
    check(ROI_POOL, case)
