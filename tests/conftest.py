"""Shared fixtures and helpers of the RoI operator tests (maskray.model.ops against torchvision.ops).

torchvision is the oracle throughout: every expected value is computed by torchvision's op on
the same inputs, never written down by hand.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch._dynamo.testing
import torchvision.ops

import maskray.model.ops

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not maskray.model.ops.has_cuda_kernels(),
    reason="needs a CUDA device and a build of maskray.model.ops with its CUDA kernels",
)

BOX_KINDS = ("inside", "partial", "outside", "degenerate")
LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed")
FEATURE = (2, 11, 13, 17)  # N, C, H, W: 11 channels = one full block of 8 and a partial one
OUTPUT_SIZE = (3, 4)
# Fixed rois for gradcheck, none of their edges or bin edges on a whole cell: RoIAlign's
# bilinear weights (and RoIPool's rounding) have kinks there.
GRADCHECK_ROIS = [[0, 0.3, 0.6, 4.7, 5.2], [1, 1.3, 0.2, 6.6, 3.4], [1, -1.7, 2.3, 3.4, 7.6], [0, 2.2, 2.3, 2.6, 2.9]]

# Tolerances for a result against torchvision run in float32 on the same (upcast) values.
# The kernels compute bfloat16/float16 with float32 accumulation and round once at the end,
# so forward and backward must be within one unit in the last place (half a unit, doubled
# for the float32 rounding differences); float32 gets assert_close's defaults.
TOLERANCE = {torch.float32: {}, torch.bfloat16: dict(rtol=2**-7, atol=1e-5), torch.float16: dict(rtol=2**-10, atol=1e-5)}


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(20240607)


def _uniform(n: int, low, high, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _boxes_of_kind(kind: str, n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """n boxes (x1, y1, x2, y2) in feature-map coordinates, float64."""
    size = torch.tensor([width, height], dtype=torch.float64)
    if kind == "inside":
        a, b = torch.rand(n, 2, generator=g, dtype=torch.float64) * size, torch.rand(n, 2, generator=g, dtype=torch.float64) * size
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
    if kind == "partial":
        # One corner inside or before the map, the other past its far edge: the box straddles an edge.
        low = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * size
        high = (torch.rand(n, 2, generator=g, dtype=torch.float64) + 0.6) * size
        return torch.cat([low, high], dim=1)
    if kind == "outside":
        # Entirely past the edge on one axis, by more than the one cell of bilinear reach.
        low = _uniform(n, 1.5, 8.0, g)[:, None] + size
        high = low + torch.rand(n, 2, generator=g, dtype=torch.float64) * size
        boxes = torch.cat([low, high], dim=1)
        before = torch.rand(n, generator=g) < 0.5  # or before the map: mirror the box
        boxes[before] = -boxes[before][:, [2, 3, 0, 1]]
        inside = _boxes_of_kind("inside", n, height, width, g)
        axis = torch.randint(0, 2, (n,), generator=g)  # only that axis is outside
        keep = torch.stack([axis == 1, axis == 0, axis == 1, axis == 0], dim=1)
        return torch.where(keep, inside, boxes)
    if kind == "degenerate":
        boxes = _boxes_of_kind("inside", n, height, width, g)
        which = torch.arange(n) % 4
        boxes[which == 0, 2] = boxes[which == 0, 0]  # zero width
        boxes[which == 1, 3] = boxes[which == 1, 1]  # zero height
        boxes[which == 2, 2:] = boxes[which == 2, :2]  # a point
        boxes[which == 3] = boxes[which == 3][:, [2, 3, 0, 1]]  # reversed corners
        return boxes
    raise ValueError(f"unknown box kind {kind!r}")


def random_rois(
    n_images: int,
    n_boxes: int,
    height: int,
    width: int,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    kinds: tuple[str, ...] = BOX_KINDS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Tensor[n_boxes, 5] of (batch_index, x1, y1, x2, y2) in image coordinates.

    The boxes are drawn on a height x width feature map and divided by ``scale`` (the op's
    spatial_scale), an equal share of each kind, in random order of kind and image (the
    kernels group rois by image, so the input order must not matter).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    counts = [n_boxes // len(kinds) + (i < n_boxes % len(kinds)) for i in range(len(kinds))]
    boxes = torch.cat([_boxes_of_kind(k, c, height, width, g) for k, c in zip(kinds, counts)]) / scale
    index = torch.randint(0, n_images, (n_boxes, 1), generator=g).to(boxes.dtype)
    rois = torch.cat([index, boxes], dim=1)[torch.randperm(n_boxes, generator=g)]
    return rois.to(dtype)


def split_by_image(rois: torch.Tensor, n_images: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The list form of ``rois`` (one Tensor[L, 4] per image) and the Tensor[K, 5] in that list's order."""
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(n_images)]
    return boxes, torch.cat([rois[rois[:, 0] == i] for i in range(n_images)])



def make_input(
    shape: tuple[int, int, int, int],
    layout: str = "contiguous",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> torch.Tensor:
    """A random Tensor[N, C, H, W] in one of LAYOUTS: contiguous, channels_last, a strided
    slice of a wider tensor, or a transposed view (neither of the last two is dense in any
    memory format, so the kernels must copy)."""
    n, c, h, w = shape
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "contiguous":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return randn(n, 2 * c, h, w + 3)[:, ::2, :, 1 : w + 1]
    if layout == "transposed":
        return randn(n, c, w, h).transpose(2, 3)
    raise ValueError(f"unknown layout {layout!r}")


def is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def output_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(input) and the gradient of <fn(input), grad_output> with respect to input.

    The input keeps its strides (detach is a view), so each call sees the layout under test.
    """
    x = input.detach().requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x, grad_output)
    return out.detach(), grad


def random_like_output(out: torch.Tensor, generator: torch.Generator, layout: torch.memory_format | None = None) -> torch.Tensor:
    """A random grad_output for ``out``, in out's layout (as the op above it would give) unless told."""
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    if layout is None:
        layout = torch.channels_last if is_channels_last(out) else torch.contiguous_format
    return grad.contiguous(memory_format=layout)


@dataclass(frozen=True)
class RoiOp:
    """One RoI operator: our function, torchvision's, our raw op and our module.

    ``defaults`` are the keyword arguments beyond output_size and spatial_scale that a call
    takes (sampling_ratio and aligned for RoIAlign, none for RoIPool); tests call them ``extra``.
    """

    name: str
    ours: Callable
    theirs: Callable
    raw: torch._ops.OpOverloadPacket
    module: type
    defaults: dict = field(default_factory=dict)
    variants: tuple[dict, ...] = ({},)  # the parity test's extra arguments
    main_variants: tuple[dict, ...] = ({},)  # a few of them, for the other tests

    def pair(self, boxes, output_size, spatial_scale=1.0, **extra):
        """(ours, theirs) as functions of the input alone."""
        return (
            lambda x: self.ours(x, boxes, output_size, spatial_scale, **extra),
            lambda x: self.theirs(x, boxes, output_size, spatial_scale, **extra),
        )

    def raw_args(self, input, rois, spatial_scale, output_size, **extra) -> tuple:
        """The raw op's positional arguments (output_size is a pair)."""
        return (input, rois, float(spatial_scale), *output_size, *{**self.defaults, **extra}.values())


def _roi_op(name: str, **options) -> RoiOp:
    """The RoiOp of ``name``, the same in maskray.model.ops, torchvision.ops and torch.ops.maskray."""
    module = getattr(maskray.model.ops, {"roi_align": "RoIAlign", "roi_pool": "RoIPool"}[name])
    return RoiOp(name, getattr(maskray.model.ops, name), getattr(torchvision.ops, name), getattr(torch.ops.maskray, name), module, **options)


ROI_ALIGN = _roi_op(
    "roi_align",
    defaults={"sampling_ratio": -1, "aligned": False},
    # sampling_ratio 0 and -1 both mean adaptive; 1, 2 and 4 are fixed grids.
    variants=tuple(dict(sampling_ratio=s, aligned=a) for a in (False, True) for s in (-1, 0, 1, 2, 4)),
    main_variants=(dict(sampling_ratio=2, aligned=True), dict(sampling_ratio=-1, aligned=False)),
)
ROI_POOL = _roi_op("roi_pool")


def assert_agree(ours, theirs, input: torch.Tensor, generator, *, convert=lambda t: t, grad_layout=None, **tolerance):
    """ours(input) and theirs(convert(input)) agree, forward and backward, under one random
    grad_output (in the layout of ours' output unless ``grad_layout``); ``convert`` also maps
    grad_output and our results onto theirs (to float32, to another device). Returns our
    (output, grad_input)."""
    grad_output = random_like_output(ours(input.detach()), generator, grad_layout)
    out, grad = output_and_grad(ours, input, grad_output)
    expected, expected_grad = output_and_grad(theirs, convert(input), convert(grad_output))
    torch.testing.assert_close(convert(out), expected, **tolerance)
    torch.testing.assert_close(convert(grad), expected_grad, **tolerance)
    return out, grad


def assert_matches_torchvision(op: RoiOp, input, boxes, output_size, spatial_scale=1.0, *, generator, grad_layout=None, **extra):
    """Our op and torchvision's agree on the same input, forward and backward."""
    ours, theirs = op.pair(boxes, output_size, spatial_scale, **extra)
    return assert_agree(ours, theirs, input, generator, grad_layout=grad_layout)


def assert_matches_float32(op: RoiOp, input: torch.Tensor, boxes: torch.Tensor, output_size, generator, **extra):
    """A call in input's dtype (float32, bfloat16 or float16) equals torchvision's float32
    call on the upcast values, to the dtype's precision, forward and backward."""
    ours, _ = op.pair(boxes, output_size, **extra)
    _, theirs = op.pair(boxes.float(), output_size, **extra)
    out, grad = assert_agree(ours, theirs, input, generator, convert=lambda t: t.float(), **TOLERANCE[input.dtype])
    assert out.dtype == grad.dtype == input.dtype


def assert_backward_deterministic(fn: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor, generator) -> None:
    """Two backward passes, and one with 1 and one with 2 threads, give bit-identical grads."""
    grad_output = random_like_output(fn(input), generator)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            grads.append(output_and_grad(fn, input, grad_output))
    finally:
        torch.set_num_threads(threads)
    for out, grad in grads[1:]:
        assert torch.equal(out, grads[0][0])
        assert torch.equal(grad, grads[0][1])


def error_cases(op: RoiOp) -> list:
    """pytest params (call, exception, match): each bad input and how the op must reject it.

    A call takes a good (input, rois) pair, on the device under test, and spoils one thing.
    """

    def raw(spoil=lambda x, r: (x, r), size=(2, 2)):
        return lambda x, r: op.raw(*op.raw_args(*spoil(x, r), 1.0, size))

    def spoiled(column, value):  # roi 1 with `value` in `column` (0: batch index, 1-4: corners)
        def call(x, r):
            r = r.clone()
            r[1, column] = value
            return op.ours(x, r, 2)

        return call

    cases = {  # each message names the op
        "output_size_zero": (lambda x, r: op.ours(x, r, 0), ValueError, "output_size must be positive"),
        "output_size_negative": (lambda x, r: op.ours(x, r, (2, -1)), ValueError, "output_size must be positive"),
        "output_size_triple": (lambda x, r: op.ours(x, r, (2, 2, 2)), ValueError, "must be an int or a pair"),
        "input_3d": (lambda x, r: op.ours(x[0], r, 2), ValueError, "input must be a 4-D tensor"),
        "input_not_tensor": (lambda x, r: op.ours(x.cpu().numpy(), r, 2), TypeError, "input must be a Tensor"),
        "boxes_k4_tensor": (lambda x, r: op.ours(x, r[:, 1:], 2), ValueError, r"shape \[K, 5\].*pass a list"),
        "boxes_k6_tensor": (lambda x, r: op.ours(x, x.new_zeros(2, 6), 2), ValueError, r"must have shape \[K, 5\]"),
        "boxes_1d_tensor": (lambda x, r: op.ours(x, r[0], 2), ValueError, r"must have shape \[K, 5\]"),
        "list_entry_k5": (lambda x, r: op.ours(x, [r[:, 1:], r], 2), ValueError, r"boxes\[1\] must have shape \[L, 4\]"),
        "boxes_not_tensors": (lambda x, r: op.ours(x, [[1.0, 1, 5, 5]], 2), TypeError, "boxes must be a Tensor"),
        "boxes_other_device": (lambda x, r: op.ours(x, r.to("meta"), 2), ValueError, "boxes are on meta but input is on"),
        "rois_float64": (lambda x, r: op.ours(x, r.double(), 2), RuntimeError, "must have the same dtype"),
        "rois_list_float16": (lambda x, r: op.ours(x, [r[:1, 1:].half()] * 2, 2), RuntimeError, "must have the same dtype"),
        "batch_index_5": (spoiled(0, 5.0), RuntimeError, r"rois\[1, 0\] = 5 is not a batch index"),
        "batch_index_negative": (spoiled(0, -1.0), RuntimeError, "is not a batch index"),
        "batch_index_fraction": (spoiled(0, 0.5), RuntimeError, "is not a batch index"),
        "batch_index_nan": (spoiled(0, float("nan")), RuntimeError, "= nan is not a batch index"),
        "corner_inf": (spoiled(3, float("inf")), RuntimeError, r"rois\[1\] = .* has a corner that is not finite"),
        "corner_nan": (spoiled(3, float("nan")), RuntimeError, "has a corner that is not finite"),
        "integer_input": (raw(lambda x, r: (x.long(), r.long())), RuntimeError, "must be a floating point tensor"),
        "raw_input_3d": (raw(lambda x, r: (x[0], r)), RuntimeError, "input must be a 4-D tensor"),
        "raw_rois_k4": (raw(lambda x, r: (x, r[:, 1:])), RuntimeError, r"rois must have shape \[K, 5\]"),
        "raw_output_size_zero": (raw(size=(0, 2)), RuntimeError, "output_size must be positive"),
    }
    params = [pytest.param(call, error, f"{op.name}: .*{match}", id=case) for case, (call, error, match) in cases.items()]
    module = op.module.__name__
    params.append(
        pytest.param(
            lambda x, r: op.module((0, 3), 1.0, **op.defaults), ValueError, f"{module}: output_size must be positive", id="module_output_size_zero"
        )
    )
    return params


# An FPN's outputs for a batch of two images padded to 256 x 320 (the second is 200 x 300):
# levels "0" to "3" at strides 4 to 32, and "pool" (stride 64), which a pooler must ignore
# unless it is named.
FPN_IMAGE_SHAPES = [(256, 320), (200, 300)]
FPN_STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}


def fpn_features(generator, channels: int = 4, layout: str = "contiguous", device: str = "cpu") -> dict[str, torch.Tensor]:
    height, width = FPN_IMAGE_SHAPES[0]
    return {
        name: make_input((2, channels, height // s, width // s), layout, generator, device=device)
        for name, s in FPN_STRIDES.items()
    }


def fpn_boxes(generator, per_image: int = 24) -> list[torch.Tensor]:
    """Boxes of each image, from 8 to 600 px a side (some past the image edge): every
    level from P2 to P5 gets some. The first image also has squares exactly on the level
    boundaries (112, 224 and 448 px), where rounding decides the level."""
    boxes = []
    for height, width in FPN_IMAGE_SHAPES:
        sides = torch.exp(_uniform(2 * per_image, 2.0, 6.4, generator)).reshape(-1, 2)  # e^2 ~ 7, e^6.4 ~ 600
        centres = torch.rand(per_image, 2, generator=generator, dtype=torch.float64) * torch.tensor([width, height])
        boxes.append(torch.cat([centres - sides / 2, centres + sides / 2], dim=1).float())
    edges = torch.tensor([[10.0, 10, 10 + s, 10 + s] for s in (112, 224, 448)])
    boxes[0] = torch.cat([boxes[0], edges])
    return boxes


def pool_per_level(pool, features: dict[str, torch.Tensor], names, boxes, output_size, **extra) -> torch.Tensor:
    """The oracle of a multi-scale pooler: each box pooled by torchvision's ``pool`` from the
    level that torchvision's LevelMapper gives it, at torchvision's inferred scale."""
    levels = [features[n] for n in features if n in names]
    scales, mapper = torchvision.ops.poolers._setup_scales(levels, FPN_IMAGE_SHAPES, 224, 4)
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
    box_levels = mapper(boxes)
    result = levels[0].new_zeros(rois.size(0), levels[0].size(1), *output_size)
    for level, (feature, scale) in enumerate(zip(levels, scales)):
        index = torch.where(box_levels == level)[0]
        result[index] = pool(feature, rois[index], output_size, scale, **extra)
    return result


def _variant_id(extra: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in extra.items()) or "plain"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Gives RoiOpContract's tests the parameters of the subclass's op."""
    cls = metafunc.cls
    if cls is None or not issubclass(cls, RoiOpContract):
        return
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", cls.op.variants, ids=_variant_id)
    if "extra" in metafunc.fixturenames:
        metafunc.parametrize("extra", cls.op.main_variants, ids=_variant_id)
    if "bad_call" in metafunc.fixturenames:
        metafunc.parametrize(("bad_call", "error", "match"), error_cases(cls.op))


class RoiOpContract:
    """Tests that both RoI ops must pass on every device; test_roi_align.py, test_roi_pool.py
    and test_ops_cuda.py subclass it.

    A subclass sets ``op`` (a RoiOp) and, for another device than the CPU, ``device``.
    """

    op: RoiOp
    device = "cpu"

    def input(self, shape=FEATURE, layout="contiguous", generator=None, dtype=torch.float32) -> torch.Tensor:
        return make_input(shape, layout, generator, dtype, self.device)

    def rois(self, n_boxes: int, generator, scale: float = 1.0, **kwargs) -> torch.Tensor:
        return random_rois(FEATURE[0], n_boxes, *FEATURE[2:], scale, generator, **kwargs).to(self.device)

    @pytest.mark.parametrize("spatial_scale", [1.0, 1 / 4, 1 / 32])
    def test_matches_torchvision(self, spatial_scale, variant, generator):
        rois = self.rois(24, generator, spatial_scale)
        x = self.input(generator=generator)
        assert_matches_torchvision(self.op, x, rois, OUTPUT_SIZE, spatial_scale, generator=generator, **variant)

    @pytest.mark.parametrize("kind", BOX_KINDS)
    def test_box_kind(self, kind, extra, generator):
        rois = self.rois(12, generator, 0.5, kinds=(kind,))
        x = self.input(generator=generator)
        out, _ = assert_matches_torchvision(self.op, x, rois, 5, 0.5, generator=generator, **extra)
        if kind == "outside":  # no sample or cell of these boxes is on the map
            assert not out.any()

    @pytest.mark.parametrize("form", ["list_of_empty", "tensor_0x5", "empty_list"])
    def test_empty_boxes(self, form, extra, generator):
        x = self.input(generator=generator)
        boxes = {"list_of_empty": [x.new_empty(0, 4)] * 2, "tensor_0x5": x.new_empty(0, 5), "empty_list": []}[form]
        if form != "empty_list":  # torchvision cannot concatenate an empty list
            assert_matches_torchvision(self.op, x, boxes, OUTPUT_SIZE, generator=generator, **extra)
        grad_output = x.new_empty(0, FEATURE[1], *OUTPUT_SIZE)
        out, grad = output_and_grad(self.op.pair(boxes, OUTPUT_SIZE, **extra)[0], x, grad_output)
        assert out.shape == grad_output.shape
        assert torch.equal(grad, torch.zeros_like(x))

    def test_list_of_boxes(self, extra, generator):
        rois = random_rois(3, 18, *FEATURE[2:], generator=generator).to(self.device)
        rois = rois[rois[:, 0] != 1]  # the middle image has no boxes
        boxes, in_list_order = split_by_image(rois, 3)
        x = self.input((3, *FEATURE[1:]), generator=generator)
        out, _ = assert_matches_torchvision(self.op, x, boxes, OUTPUT_SIZE, generator=generator, **extra)
        assert torch.equal(out, self.op.ours(x, in_list_order, OUTPUT_SIZE, **extra))

    @pytest.mark.parametrize("channels", [3, 11, 40])  # 40: channels_last blocks of 32 and a partial one
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_layout(self, layout, channels, extra, generator):
        x = self.input((2, channels, *FEATURE[2:]), layout, generator)
        out, grad = assert_matches_torchvision(self.op, x, self.rois(16, generator), OUTPUT_SIZE, generator=generator, **extra)
        # The layout rule: channels_last in, channels_last out (and back); anything else NCHW.
        assert is_channels_last(out) == (layout == "channels_last")
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        assert is_channels_last(grad) == (layout == "channels_last")

    @pytest.mark.parametrize("grad_layout", [torch.contiguous_format, torch.channels_last], ids=["grad_nchw", "grad_nhwc"])
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_grad_input_follows_grad_layout(self, layout, grad_layout, extra, generator):
        x, rois = self.input(FEATURE, layout, generator), self.rois(16, generator)
        _, grad = assert_matches_torchvision(
            self.op, x, rois, OUTPUT_SIZE, generator=generator, grad_layout=grad_layout, **extra
        )
        assert is_channels_last(grad) == (grad_layout == torch.channels_last)

    def test_float64(self, extra, generator):
        x = self.input(generator=generator, dtype=torch.float64)
        rois = self.rois(24, generator, 0.25, dtype=torch.float64)
        assert_matches_torchvision(self.op, x, rois, OUTPUT_SIZE, 0.25, generator=generator, **extra)

    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
    def test_half(self, dtype, layout, extra, generator):
        x = self.input(FEATURE, layout, generator, dtype)
        assert_matches_float32(self.op, x, self.rois(24, generator, dtype=dtype), OUTPUT_SIZE, generator, **extra)

    @pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["autocast_bfloat16", "autocast_float16"])
    @pytest.mark.parametrize("input_low, rois_low", [(False, False), (True, True), (False, True)], ids=["f32-f32", "low-low", "f32-low"])
    def test_autocast(self, input_low, rois_low, autocast_dtype, extra, generator):
        # Under autocast the op runs in float32 (input and rois cast) and returns the input's dtype.
        x = self.input(generator=generator, dtype=autocast_dtype if input_low else torch.float32)
        rois = self.rois(24, generator, dtype=autocast_dtype if rois_low else torch.float32)
        with torch.autocast(self.device, dtype=autocast_dtype):
            assert_matches_float32(self.op, x, rois, OUTPUT_SIZE, generator, **extra)

    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_gradcheck(self, layout, extra, generator):
        # Distinct values a whole unit apart: gradcheck's perturbation never changes RoIPool's argmax.
        x = torch.randperm(2 * 3 * 6 * 7, generator=generator, dtype=torch.float64).reshape(2, 3, 6, 7)
        x = x.to(self.device).contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        x.requires_grad_()
        rois = torch.tensor(GRADCHECK_ROIS, dtype=torch.float64, device=self.device)
        # fast_mode: a few random projections of the Jacobian, not hundreds of forward calls (each
        # a parallel region, slow on busy CI cores). nondet_tol: a CUDA backward adds with atomics.
        assert torch.autograd.gradcheck(self.op.pair(rois, (2, 3), **extra)[0], (x,), fast_mode=True, nondet_tol=1e-12)

    @pytest.mark.parametrize("case", ["contiguous", "channels_last", "float64", "no_rois"])
    def test_opcheck(self, case, extra, generator):
        dtype = torch.float64 if case == "float64" else torch.float32
        x = self.input((2, 5, 9, 11), "channels_last" if case == "channels_last" else "contiguous", generator, dtype)
        rois = random_rois(2, 0 if case == "no_rois" else 8, 9, 11, 0.5, generator, dtype=dtype).to(self.device)
        args = self.op.raw_args(x.requires_grad_(), rois, 0.5, OUTPUT_SIZE, **extra)
        torch.library.opcheck(self.op.raw.default, args)

    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_compile_matches_eager(self, layout, extra, generator):
        def f(x, rois):
            return self.op.ours(x, rois, OUTPUT_SIZE, 0.5, **extra).sin()  # sin: an op around it in the graph

        torch._dynamo.reset()  # one fresh compile per case, never the recompile limit
        backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
        x, rois = self.input(FEATURE, layout, generator), self.rois(16, generator, 0.5)
        assert_agree(lambda t: compiled(t, rois), lambda t: f(t, rois), x, generator)
        # Compiled for real (fullgraph: in one graph), not run eagerly.
        assert any(node.target in (self.op.raw, self.op.raw.default) for graph in backend.graphs for node in graph.graph.nodes)

    def test_export(self, extra, generator):
        module = self.op.module(OUTPUT_SIZE, 0.5, **extra)
        x = self.input(generator=generator)
        # The number of rois is dynamic: the exported program serves any count.
        program = torch.export.export(module, (x, self.rois(8, generator, 0.5)), dynamic_shapes=(None, {0: torch.export.Dim("rois")}))
        assert self.op.raw.default in {node.target for node in program.graph.nodes}
        rois = self.rois(13, generator, 0.5)
        torch.testing.assert_close(program.module()(x, rois), self.op.theirs(x, rois, OUTPUT_SIZE, 0.5, **extra))

    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_deterministic(self, layout, extra, generator):
        if self.device != "cpu":
            pytest.skip("on CUDA the backward is deterministic under torch.use_deterministic_algorithms(True) only: "
                        "tests/test_ops_cuda.py::test_deterministic_backward")
        # 40 channels, 2 images: enough work items for both threads in every kernel.
        x = self.input((2, 40, *FEATURE[2:]), layout, generator)
        fn, _ = self.op.pair(self.rois(32, generator), OUTPUT_SIZE, **extra)
        assert_backward_deterministic(fn, x, generator)

    def test_bad_input(self, bad_call, error, match):
        x = self.input((2, 3, 8, 8))
        rois = torch.tensor([[0.0, 1, 1, 5, 5], [1.0, 0, 2, 6, 7]], device=self.device)
        with pytest.raises(error, match=match):
            bad_call(x, rois)


# Real services (loopback S3 server, local Ray): tests/services.py.
from tests.hub_cache import seeded_torch_home, torch_home  # noqa: E402, F401
from tests.services import ray_cluster, ray_local, s3, s3_server  # noqa: E402, F401
