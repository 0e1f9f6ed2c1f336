"""maskray.model.postprocess against torchvision's paste and pycocotools' encoder.

The oracle throughout: ``paste_masks_in_image(...)[:, 0] > threshold`` (torchvision 0.29)
encoded by ``pycocotools.mask.encode``; the counts strings must be equal byte for byte.
"""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import expand_boxes, paste_masks_in_image

from maskray.model.postprocess import (
    box_masks_to_rle_counts,
    encode_box_masks,
    paste_boxes,
    paste_masks_to_rle,
    rle_counts_to_string,
)

BOX_KINDS = ("inside", "over", "edge", "full_height", "outside", "tiny", "degenerate")


# --------------------------------------------------------------------------------------------
# Oracle and inputs


def pasted_by_torchvision(masks: torch.Tensor, boxes: torch.Tensor, image_size) -> torch.Tensor:
    """Tensor[N, H, W]: torchvision's paste of each mask, one at a time.

    torchvision raises for some boxes that miss the image (left of or above it: a negative
    slice end wraps around). Those get zeros, once checked to miss the image indeed.
    """
    height, width = image_size
    out = []
    for i in range(masks.size(0)):
        try:
            out.append(paste_masks_in_image(masks[i : i + 1], boxes[i : i + 1], image_size)[0, 0])
        except RuntimeError:
            m = masks.size(-1)
            x0, y0, x1, y1 = expand_boxes(boxes[i : i + 1], (m + 2) / m).to(torch.int64)[0].tolist()
            assert max(x0, 0) >= min(x1 + 1, width) or max(y0, 0) >= min(y1 + 1, height), "torchvision raised for a box in the image"
            out.append(masks.new_zeros(image_size))
    return torch.stack(out) if out else masks.new_zeros((0, *image_size))


def oracle(masks: torch.Tensor, boxes: torch.Tensor, image_size, threshold: float = 0.5) -> tuple[list[dict], np.ndarray]:
    """(RLEs with str counts, dense uint8[N, H, W]) from torchvision + pycocotools."""
    dense = (pasted_by_torchvision(masks, boxes, image_size) > threshold).cpu().numpy().astype(np.uint8)
    rles = [mask_util.encode(np.asfortranarray(d)) for d in dense]
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles], dense


def assert_matches_oracle(masks, boxes, image_size, threshold: float = 0.5, **kwargs) -> list[dict]:
    rles, areas = paste_masks_to_rle(masks, boxes, image_size, threshold, **kwargs)
    expected, dense = oracle(masks if masks.dim() == 4 else masks[:, None], boxes, image_size, threshold)
    assert len(rles) == len(expected)
    for i, (got, want) in enumerate(zip(rles, expected)):
        assert got == want, f"instance {i}: box {boxes[i].tolist()}"
    assert areas.dtype == torch.int64 and areas.device.type == "cpu"
    assert areas.tolist() == [int(a) for a in mask_util.area([{**r, "counts": r["counts"].encode()} for r in expected])]
    assert areas.tolist() == dense.reshape(len(dense), -1).sum(1).tolist()
    return rles


def random_boxes(rng: np.random.Generator, n: int, image_size, kinds=BOX_KINDS) -> torch.Tensor:
    """Tensor[n, 4] float32 xyxy boxes of the given kinds (each picked at random)."""
    height, width = image_size
    size = np.array([width, height], dtype=np.float64)
    boxes = []
    for kind in rng.choice(kinds, n):
        if kind == "inside":
            a, b = rng.uniform(0, size), rng.uniform(0, size)
            box = np.concatenate([np.minimum(a, b), np.maximum(a, b)])
        elif kind == "over":  # past one or more edges
            a, b = rng.uniform(-0.6 * size, 1.6 * size), rng.uniform(-0.6 * size, 1.6 * size)
            box = np.concatenate([np.minimum(a, b), np.maximum(a, b)])
        elif kind == "edge":  # sides on or just around the image's edges
            low = rng.choice([-0.7, -0.3, 0.0, 0.4], 2)
            high = size - 1 + rng.choice([-0.4, 0.0, 0.3, 1.0, 1.6], 2)
            box = np.concatenate([low, high])
        elif kind == "full_height":  # covers whole columns: runs go on from one column to the next
            x = np.sort(rng.uniform(-0.2 * width, 1.2 * width, 2))
            box = np.array([x[0], rng.uniform(-3, 0.5), x[1], rng.uniform(height - 1.5, height + 3)])
        elif kind == "outside":  # wholly past one side, near or far
            a, b = rng.uniform(0, size), rng.uniform(0, size)
            box = np.concatenate([np.minimum(a, b), np.maximum(a, b)])
            axis, far = rng.integers(2), rng.uniform(2, 1.5 * size.max() + 2)
            if rng.random() < 0.5:  # before the image
                box[[axis, axis + 2]] = -far - np.array([rng.uniform(0, size[axis]), 0])
            else:
                box[[axis, axis + 2]] = size[axis] + far + np.array([0, rng.uniform(0, size[axis])])
        elif kind == "tiny":  # less than a pixel a side
            a = rng.uniform(-1, size)
            box = np.concatenate([a, a + rng.uniform(0, 1, 2)])
        else:  # degenerate: zero width or height, or reversed corners
            a, b = rng.uniform(-1, size + 1), rng.uniform(-1, size + 1)
            box = np.concatenate([a, b])
            if rng.random() < 0.3:
                box[2 + rng.integers(2)] = box[rng.integers(2)]
        boxes.append(box)
    return torch.tensor(np.array(boxes).reshape(n, 4), dtype=torch.float32)


def random_masks(g: torch.Generator, n: int, m: int, style: str = "uniform") -> torch.Tensor:
    """Tensor[n, 1, m, m] of probabilities: uniform noise or smooth blobs (long runs)."""
    if style == "uniform":
        return torch.rand(n, 1, m, m, generator=g)
    coarse = torch.randn(n, 1, max(m // 4, 1), max(m // 4, 1), generator=g) * 4
    return torch.nn.functional.interpolate(coarse, size=(m, m), mode="bilinear", align_corners=False).sigmoid()


# --------------------------------------------------------------------------------------------
# paste_masks_to_rle against the oracle

IMAGE_SIZES = [(1, 1), (1, 40), (40, 1), (3, 90), (90, 3), (37, 53), (64, 64), (17, 5)]


@pytest.mark.parametrize("seed", range(24))
def test_random_cases_match_torchvision(seed):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    image_size = IMAGE_SIZES[seed % len(IMAGE_SIZES)]
    m = [1, 2, 5, 28][seed % 4]
    n = int(rng.integers(1, 20))
    masks = random_masks(g, n, m, "blobs" if seed % 3 else "uniform")
    threshold = [0.5, 0.5, 0.3, 0.0, 0.8][seed % 5]
    assert_matches_oracle(masks, random_boxes(rng, n, image_size), image_size, threshold)


@pytest.mark.parametrize("kind", BOX_KINDS)
def test_box_kind(kind):
    rng = np.random.default_rng(len(kind))
    g = torch.Generator().manual_seed(1)
    for image_size in [(31, 47), (1, 9), (9, 1)]:
        masks = random_masks(g, 30, 14, "blobs")
        assert_matches_oracle(masks, random_boxes(rng, 30, image_size, (kind,)), image_size)


def test_outside_boxes_are_empty():
    # Wholly past each side, near (within the padding's reach) and far; torchvision raises for
    # some of these (see pasted_by_torchvision), the result is an empty mask for all.
    image_size = (20, 30)
    boxes = torch.tensor(
        [[-9.0, 2, -2.5, 8], [-50, 2, -40, 8], [31.5, 2, 40, 8], [100, 2, 300, 8],
         [2.0, -9, 8, -2.5], [2, -50, 8, -40], [2, 20.5, 8, 30], [2, 100, 8, 300], [-9, -9, -2.5, -2.5]]
    )
    masks = torch.ones(len(boxes), 1, 28, 28)
    rles = assert_matches_oracle(masks, boxes, image_size)
    assert all(r["counts"] == rle_counts_to_string([600]) for r in rles)


def test_boxes_just_left_of_the_image_reach_column_zero():
    # The grown box is truncated toward zero, not floored: a right edge at x = -0.9 becomes
    # pixel 0, so a box wholly left of the image by less than a pixel still pastes column 0.
    image_size = (10, 10)
    boxes = torch.tensor([[-9.0, 2, -1.2, 8], [2, -9, 8, -1.2]])
    assert paste_boxes(boxes, 28).tolist() == [[-9, 1, 0, 8], [1, -9, 8, 0]]
    rles = assert_matches_oracle(torch.ones(2, 1, 28, 28), boxes, image_size)
    assert rles[0]["counts"] == rle_counts_to_string([1, 8, 91])  # rows 1..8 of column 0
    assert rles[1]["counts"] == rle_counts_to_string([10, 1, 9, 1, 9, 1, 9, 1, 9, 1, 9, 1, 9, 1, 9, 1, 19])  # row 0


def test_full_height_box_runs_join_across_columns():
    image_size = (12, 10)
    boxes = torch.tensor([[2.0, 0, 6, 11], [-5, -5, 20, 20], [0.0, 0, 9, 11]])
    rles = assert_matches_oracle(torch.ones(3, 1, 28, 28), boxes, image_size)
    assert rles[1]["counts"] == rle_counts_to_string([0, 120])  # the whole image, one run


def test_degenerate_boxes_match_torchvision():
    # Reversed corners stay reversed when grown: torchvision resizes to one pixel and pastes
    # nothing, except where truncation makes both corners the same pixel.
    image_size = (16, 16)
    boxes = torch.tensor(
        [[8.0, 3, 2, 12], [3, 12, 9, 4], [5.9, 5.9, 5.1, 5.1], [5.0, 5, 5, 5], [-0.4, 3, -0.9, 9], [3, 3, 3, 15]]
    )
    assert_matches_oracle(torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)), boxes, image_size)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_masks(value):
    rng = np.random.default_rng(3)
    masks = torch.full((40, 1, 28, 28), value)
    rles = assert_matches_oracle(masks, random_boxes(rng, 40, (25, 35)), (25, 35))
    if value == 0.0:
        assert all(r["counts"] == rle_counts_to_string([25 * 35]) for r in rles)


def test_realistic_image():
    # 800 x 1333 with boxes of 20 to 400 pixels: counts in the hundreds of thousands.
    rng = np.random.default_rng(5)
    g = torch.Generator().manual_seed(5)
    image_size = (800, 1333)
    centre = rng.uniform(0, [1333, 800], (8, 2))
    half = rng.uniform(10, 200, (8, 2))
    boxes = torch.tensor(np.concatenate([centre - half, centre + half], 1), dtype=torch.float32)
    assert_matches_oracle(random_masks(g, 8, 28, "blobs"), boxes, image_size)


@pytest.mark.parametrize("threshold", [0, 0.05, 0.25, 0.5, 0.75, 0.999, 1.0, 3])
def test_thresholds(threshold):
    rng = np.random.default_rng(11)
    masks = random_masks(torch.Generator().manual_seed(11), 12, 10, "blobs")
    assert_matches_oracle(masks, random_boxes(rng, 12, (30, 40)), (30, 40), threshold)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("boxes_dtype", ["float32", "same"])
def test_dtypes(dtype, boxes_dtype):
    # torchvision computes in the masks' dtype (and the boxes' for the boxes): so must we.
    rng = np.random.default_rng(7)
    image_size = (41, 67)
    masks = random_masks(torch.Generator().manual_seed(7), 24, 28, "blobs").to(dtype)
    boxes = random_boxes(rng, 24, image_size)
    if boxes_dtype == "same":
        boxes = boxes.to(dtype)
    assert_matches_oracle(masks, boxes, image_size, 0.3)


def test_three_dimensional_masks_and_views():
    rng = np.random.default_rng(2)
    g = torch.Generator().manual_seed(2)
    image_size = (30, 30)
    boxes = random_boxes(rng, 10, image_size)
    wide = random_masks(g, 10, 28).expand(10, 3, 28, 28).transpose(2, 3)  # not contiguous
    expected, _ = paste_masks_to_rle(wide[:, 1:2].contiguous(), boxes, image_size)
    assert paste_masks_to_rle(wide[:, 1], boxes, image_size)[0] == expected
    assert paste_masks_to_rle(wide[:, 1:2], boxes, image_size)[0] == expected
    assert_matches_oracle(wide[:, 1], boxes, image_size)


def test_requires_grad_input():
    masks = torch.rand(3, 1, 28, 28, requires_grad=True)
    boxes = torch.tensor([[1.0, 1, 10, 12], [0, 0, 19, 19], [5, 5, 6, 7]], requires_grad=True)
    assert_matches_oracle(masks, boxes, (20, 20))


@pytest.mark.parametrize("shape", [(0, 1, 28, 28), (0, 28, 28)])
def test_no_instances(shape):
    rles, areas = paste_masks_to_rle(torch.zeros(shape), torch.zeros(0, 4), (10, 20))
    assert rles == []
    assert areas.dtype == torch.int64 and areas.shape == (0,)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_decodes_to_the_dense_mask():
    rng = np.random.default_rng(9)
    image_size = (33, 21)
    masks = random_masks(torch.Generator().manual_seed(9), 16, 28, "blobs")
    boxes = random_boxes(rng, 16, image_size)
    rles, _ = paste_masks_to_rle(masks, boxes, image_size)
    _, dense = oracle(masks, boxes, image_size)
    decoded = mask_util.decode([{**r, "counts": r["counts"].encode()} for r in rles])
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), dense)


def test_huge_image_without_dense_masks():
    # 20000 x 20000: a float image per instance would be 1.6 GB. The box is well inside, so its
    # pixels are those of the same paste on a small image, shifted: the counts for the huge
    # image follow, and pycocotools compresses them.
    height, width = 20000, 20000
    masks = random_masks(torch.Generator().manual_seed(4), 2, 28, "blobs")
    local = torch.tensor([[10.0, 20, 50, 41], [3.5, 7.25, 30.5, 60.75]])
    shift = torch.tensor([11000.0, 19000, 11000, 19000])
    rles, areas = paste_masks_to_rle(masks, local + shift, (height, width))
    _, small = oracle(masks, local, (80, 80))
    for rle, area, dense in zip(rles, areas.tolist(), small):
        ys, xs = np.nonzero(dense)
        index = np.sort((xs + 11000).astype(np.int64) * height + ys + 19000)
        breaks = np.flatnonzero(np.diff(index) != 1)
        starts = index[np.concatenate(([0], breaks + 1))]
        stops = index[np.concatenate((breaks, [len(index) - 1]))] + 1
        bounds = np.stack([starts, stops], 1).ravel()
        counts = np.diff(np.concatenate(([0], bounds, [height * width]))).tolist()
        expected = mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        assert rle == {"size": [height, width], "counts": expected["counts"].decode()}
        assert area == len(index)


# --------------------------------------------------------------------------------------------
# paste_boxes


@pytest.mark.parametrize("m", [1, 7, 28])
def test_paste_boxes_match_torchvision(m):
    rng = np.random.default_rng(m)
    boxes = random_boxes(rng, 200, (50, 70))
    expected = expand_boxes(boxes, (m + 2) / m).to(torch.int64)
    assert torch.equal(paste_boxes(boxes, m), expected)


# --------------------------------------------------------------------------------------------
# Box-local masks to RLE


def dense_counts(dense: np.ndarray) -> list[int]:
    """Uncompressed RLE counts of a dense mask, the plain way: column-major runs from 0s."""
    pixels = dense.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate(([0], pixels)))) if pixels.size else np.zeros(0, int)
    bounds = np.concatenate(([0], changes, [pixels.size]))
    return np.diff(bounds).tolist()


def random_placed_masks(rng: np.random.Generator, n: int, image_size):
    """n random binary masks, each at a random place inside the image, some of no pixel, some
    the image's full height, some touching its edges; and the dense masks they make."""
    height, width = image_size
    masks, origins, dense = [], [], np.zeros((n, height, width), dtype=np.uint8)
    for i in range(n):
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        if rng.random() < 0.3:
            h = height
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        style = rng.choice(["random", "ones", "zeros", "sparse"])
        p = {"random": 0.5, "ones": 1.0, "zeros": 0.0, "sparse": 0.05}[style]
        local = rng.random((h, w)) < p
        masks.append(local)
        origins.append((x, y))
        dense[i, y : y + h, x : x + w] = local
    return masks, origins, dense


@pytest.mark.parametrize("image_size", [(1, 1), (1, 30), (30, 1), (23, 17), (64, 100)])
def test_encode_box_masks(image_size):
    rng = np.random.default_rng(sum(image_size))
    masks, origins, dense = random_placed_masks(rng, 60, image_size)
    rles, areas = encode_box_masks(masks, origins, image_size)
    counts = box_masks_to_rle_counts(masks, origins, image_size)
    for i, d in enumerate(dense):
        expected = mask_util.encode(np.asfortranarray(d))
        assert rles[i] == {"size": list(image_size), "counts": expected["counts"].decode()}
        assert counts[i].tolist() == dense_counts(d)
    assert areas.tolist() == dense.reshape(len(dense), -1).sum(1).tolist()


def test_encode_box_masks_takes_tensors_and_uint8():
    rng = np.random.default_rng(0)
    masks, origins, _ = random_placed_masks(rng, 10, (20, 20))
    expected, _ = encode_box_masks(masks, origins, (20, 20))
    assert encode_box_masks([torch.from_numpy(m) for m in masks], origins, (20, 20))[0] == expected
    assert encode_box_masks([m.astype(np.uint8) * 7 for m in masks], origins, (20, 20))[0] == expected


def test_encode_no_masks():
    rles, areas = encode_box_masks([], [], (5, 5))
    assert rles == [] and areas.shape == (0,)
    assert box_masks_to_rle_counts([], [], (5, 5)) == []


# --------------------------------------------------------------------------------------------
# rle_counts_to_string


def pycocotools_string(counts: list[int]) -> str:
    """pycocotools' compression of uncompressed counts.

    pycocotools 2.0.11's rleToString allocates 6 characters a count and writes a terminating
    NUL after them: counts of 6 characters on average (2**24 and more) or any of 7 (2**29 and
    more) overrun its buffer and corrupt the heap. Callers keep below that.
    """
    assert len(reference_string(counts)) < 6 * len(counts) and max(counts) < 2**29, "pycocotools would overrun"
    total = max(sum(counts), 1)
    return mask_util.frPyObjects({"size": [1, total], "counts": counts}, 1, total)["counts"].decode()


def reference_string(counts: list[int]) -> str:
    """maskApi.c's rleToString, line by line in Python: for counts pycocotools cannot take."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # Python's >> on ints is arithmetic, as on C's long
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(out)


def test_rle_counts_to_string_random():
    rng = np.random.default_rng(0)
    for case in range(300):
        n = int(rng.integers(1, 12)) if case % 3 else int(rng.integers(1, 200))
        high = [2, 40, 1100, 40000, 2**20, 2**29, 2**32][case % 7]
        counts = rng.integers(0, high, n)
        if high == 2**29:  # small counts between: 6 characters on average would overrun pycocotools
            counts[1::2] = rng.integers(0, 40, len(counts[1::2]))
        counts = counts.tolist()
        expected = reference_string(counts)
        if high <= 2**29 and len(expected) < 6 * n:
            assert pycocotools_string(counts) == expected, counts  # the reference is right
        assert rle_counts_to_string(counts) == expected, counts


@pytest.mark.parametrize(
    "counts",
    [[], [0], [5], [0, 7], [3, 0, 0, 4], [15], [16], [31], [32], [511], [512], [2**29 - 1, 0, 0, 1],
     [1, 2, 3, 4, 5, 6, 7, 8], [100, 3, 1, 40, 99, 2, 0, 7], [2**29, 1, 0, 5], [2**32 - 1, 0, 2**32 - 1, 0, 1],
     [0, 2**32 - 1, 1, 0, 2**31]],
    ids=str,
)
def test_rle_counts_to_string_edges(counts):
    # Sign boundaries of the 5-bit groups (15/16, 511/512, 2**29) and changes up to 2**32 - 1.
    expected = reference_string(counts)
    if counts and max(counts) < 2**29 and len(expected) < 6 * len(counts):
        assert expected == pycocotools_string(counts)
    assert rle_counts_to_string(counts) == expected
    assert rle_counts_to_string(np.array(counts, dtype=np.uint32)) == expected
    assert rle_counts_to_string(torch.tensor(counts, dtype=torch.int64)) == expected


# --------------------------------------------------------------------------------------------
# Bad input


def _call(masks=None, boxes=None, image_size=(10, 10), threshold=0.5):
    masks = torch.rand(2, 1, 28, 28) if masks is None else masks
    boxes = torch.tensor([[1.0, 1, 5, 5], [2, 2, 8, 9]]) if boxes is None else boxes
    return paste_masks_to_rle(masks, boxes, image_size, threshold)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"masks": torch.rand(2, 28)}, r"mask_probs must have shape \[N, 1, M, M\]"),
        ({"masks": torch.rand(2, 2, 28, 28)}, r"mask_probs must have shape"),
        ({"masks": torch.rand(2, 1, 28, 14)}, r"mask_probs must have shape"),
        ({"masks": torch.rand(2, 1, 0, 0)}, r"mask_probs must have shape .* M > 0"),
        ({"masks": torch.ones(2, 1, 28, 28, dtype=torch.int64)}, "mask_probs must be a floating point tensor"),
        ({"boxes": torch.zeros(2, 5)}, r"boxes must have shape \[N, 4\]"),
        ({"boxes": torch.zeros(4)}, r"boxes must have shape \[N, 4\]"),
        ({"boxes": torch.zeros(2, 4, dtype=torch.int32)}, "boxes must be a floating point tensor"),
        ({"boxes": torch.zeros(3, 4)}, "mask_probs and boxes must have the same N, got 2 and 3"),
        ({"boxes": torch.zeros(2, 4, device="meta")}, "boxes are on meta but mask_probs is on cpu"),
        ({"boxes": torch.tensor([[0.0, 0, float("nan"), 5], [0, 0, 1, 1]])}, "boxes must be finite"),
        ({"boxes": torch.tensor([[0.0, 0, float("inf"), 5], [0, 0, 1, 1]])}, "boxes must be finite"),
        ({"image_size": (0, 10)}, "image_size must be positive"),
        ({"image_size": (10, -1)}, "image_size must be positive"),
        ({"image_size": (2**16, 2**16)}, r"image_size 65536 x 65536 has 2\*\*32 pixels or more"),
        ({"image_size": (10,)}, r"image_size must be a pair of ints \(height, width\)"),
        ({"image_size": (10.5, 3)}, r"image_size must be a pair of ints"),
        ({"image_size": "ab"}, r"image_size must be a pair of ints"),
        ({"threshold": -0.1}, "threshold must be >= 0"),
        ({"threshold": float("nan")}, "threshold must be >= 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=f"paste_masks_to_rle: {match}"):
        _call(**kwargs)


def test_bad_input_types():
    with pytest.raises(TypeError, match="paste_masks_to_rle: mask_probs must be a Tensor"):
        paste_masks_to_rle(np.zeros((1, 1, 28, 28)), torch.zeros(1, 4), (5, 5))
    with pytest.raises(TypeError, match="paste_masks_to_rle: boxes must be a Tensor"):
        paste_masks_to_rle(torch.zeros(1, 1, 28, 28), [[0.0, 0, 1, 1]], (5, 5))
    with pytest.raises(TypeError, match="paste_masks_to_rle: threshold must be a real number"):
        paste_masks_to_rle(torch.zeros(1, 1, 28, 28), torch.zeros(1, 4), (5, 5), "0.5")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: encode_box_masks([np.ones((3, 3))], [(0, 0), (1, 1)], (5, 5)), "masks and origins must have the same length"),
        (lambda: encode_box_masks([np.ones((3, 3, 1))], [(0, 0)], (5, 5)), r"masks\[0\] must be 2-D"),
        (lambda: encode_box_masks([np.ones((3, 3))], [(3, 0)], (5, 5)), r"masks\[0\] of shape \(3, 3\) at origins\[0\] = \(3, 0\) is not inside"),
        (lambda: encode_box_masks([np.ones((3, 3))], [(0, -1)], (5, 5)), r"is not inside the 5 x 5 image"),
        (lambda: encode_box_masks([np.ones((3, 3))], [(0.5, 0)], (5, 5)), r"origins\[0\] must be a pair of ints"),
        (lambda: encode_box_masks([], [], (5, 0)), "image_size must be positive"),
        (lambda: box_masks_to_rle_counts([np.ones((6, 1))], [(0, 0)], (5, 5)), "box_masks_to_rle_counts: masks\\[0\\]"),
        (lambda: rle_counts_to_string([1, -1]), r"counts must be in \[0, 2\*\*32\)"),
        (lambda: rle_counts_to_string([2**32]), r"counts must be in \[0, 2\*\*32\)"),
        (lambda: rle_counts_to_string([[1, 2]]), "counts must be a 1-D sequence of ints"),
        (lambda: rle_counts_to_string([1.5]), "counts must be a 1-D sequence of ints"),
        (lambda: paste_boxes(torch.zeros(2, 4), 0), "paste_boxes: mask_size must be a positive int"),
        (lambda: paste_boxes(torch.zeros(2, 3), 28), r"paste_boxes: boxes must have shape \[N, 4\]"),
    ],
)
def test_bad_input_of_the_pieces(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# CUDA


def identity_boxes(corners: list[tuple[int, int]], m: int) -> torch.Tensor:
    """Boxes whose padded M x M mask is pasted at (M + 2) x (M + 2) pixels from each corner: an
    exact resize (the source of each pixel is a pixel), so every device computes the same."""
    side = m * (m + 1) / (m + 2)  # grown by (m + 2) / m: m + 1 pixels from first to last
    return torch.tensor([[x + 0.1 + (m + 1) / 2 - side / 2, y + 0.1 + (m + 1) / 2 - side / 2,
                          x + 0.1 + (m + 1) / 2 + side / 2, y + 0.1 + (m + 1) / 2 + side / 2] for x, y in corners])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_matches_cpu(dtype):
    image_size = (30, 50)  # the boxes at y = 0 span its full height
    m = 28
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    # Exact resizes (the full height, over the right and bottom edges, wholly below or right):
    # the CUDA and CPU results are identical, and torchvision's.
    boxes = identity_boxes([(0, 0), (5, 3), (30, 2), (3, 25), (40, 30), (10, 0), (60, 5)], m)
    assert torch.equal(paste_boxes(boxes, m)[:, 2:] - paste_boxes(boxes, m)[:, :2], torch.full((7, 2), m + 1))
    masks = random_masks(g, len(boxes), m, "blobs").to(dtype)
    on_cpu = paste_masks_to_rle(masks, boxes, image_size)
    on_cuda = paste_masks_to_rle(masks.cuda(), boxes.cuda(), image_size)
    assert on_cuda[0] == on_cpu[0]
    assert torch.equal(on_cuda[1], on_cpu[1]) and on_cuda[1].device.type == "cpu"
    assert_matches_oracle(masks, boxes, image_size)
    # Any boxes: the same as torchvision's paste on the GPU (a CUDA bilinear resize may round
    # differently from the CPU's in the last bit, which a pixel at the threshold would show).
    masks = random_masks(g, 60, m, "blobs").to(dtype)
    boxes = random_boxes(rng, 60, image_size)
    assert_matches_oracle(masks.cuda(), boxes.cuda(), image_size)
