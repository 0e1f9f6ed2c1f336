"""Mask R-CNN's masks straight to COCO RLE, without a full-image tensor per instance.

torchvision pastes every 28x28 mask probability map into a float image of its own
(``paste_masks_in_image``), and callers then threshold it and run ``pycocotools.mask.encode``:
100 instances on an 800x1333 image are 400 MB of floats. Here each mask is resized and
thresholded over its box only, and its run-length encoding for the whole image is computed
from that box-local binary mask. The result is byte for byte what torchvision's paste,
``> threshold`` and pycocotools give, because the paste does torchvision's arithmetic: the same
float ops on the same device and dtype, the same ``F.interpolate`` call.

COCO RLE, for reference: the mask is read in column-major (Fortran) order, the counts are the
lengths of alternating runs starting with zeros (so the first count may be 0), and the
compressed string codes each count (after the first three, minus the count two before it) in
5-bit groups, low group first, as characters ``48 + group`` with 0x20 added while more follow,
until the rest is the sign extension of the last group (pycocotools' ``rleToString``).

The pieces are public: ``paste_boxes`` (the integer boxes torchvision pastes at),
``encode_box_masks`` / ``box_masks_to_rle_counts`` (box-local binary masks to RLE) and
``rle_counts_to_string``.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "box_masks_to_rle_counts",
    "encode_box_masks",
    "paste_boxes",
    "paste_masks_to_rle",
    "rle_counts_to_string",
]

# torchvision pads each mask by one zero pixel a side, so that the resized mask fades out at
# the box edge rather than stopping at a hard edge, and grows the box to match.
_PADDING = 1
# pycocotools keeps counts as C unsigned ints.
_MAX_COUNT = 2**32 - 1
# Beyond this, a pixel coordinate no longer converts to int64 safely (and means nothing anyway).
_MAX_COORD = 2.0**62


# --------------------------------------------------------------------------------------------
# Argument checks


def _image_size(image_size: Sequence[int], fn: str) -> tuple[int, int]:
    try:
        height, width = (operator.index(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: image_size must be a pair of ints (height, width), got {image_size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{fn}: image_size must be positive, got {image_size!r}")
    if height * width > _MAX_COUNT:
        raise ValueError(f"{fn}: image_size {height} x {width} has 2**32 pixels or more, past what COCO RLE counts hold")
    return height, width


def _check_float_tensor(t: object, name: str, fn: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating point tensor, got {t.dtype}")


def _check_boxes(boxes: Tensor, fn: str) -> None:
    _check_float_tensor(boxes, "boxes", fn)
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"{fn}: boxes must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")


def _mask_batch(mask_probs: Tensor, fn: str) -> Tensor:
    """mask_probs as Tensor[N, 1, M, M]."""
    _check_float_tensor(mask_probs, "mask_probs", fn)
    shape = tuple(mask_probs.shape)
    if mask_probs.dim() == 3:
        mask_probs = mask_probs.unsqueeze(1)
    if mask_probs.dim() != 4 or mask_probs.size(1) != 1 or mask_probs.size(2) != mask_probs.size(3) or mask_probs.size(3) == 0:
        raise ValueError(f"{fn}: mask_probs must have shape [N, 1, M, M] or [N, M, M] with M > 0, got {shape}")
    return mask_probs


def _threshold(threshold: float, fn: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{fn}: threshold must be a real number, got {threshold!r}")
    # Below 0, every pixel outside a box (0 in torchvision's pasted image) would be foreground:
    # no box-local encoding can say that, and no caller means it.
    if not threshold >= 0:  # also NaN
        raise ValueError(f"{fn}: threshold must be >= 0 (pixels outside a box are 0), got {threshold!r}")
    return float(threshold)


def _pixel_boxes(expanded: Tensor, fn: str) -> Tensor:
    """Expanded float boxes to int64 the way torchvision does (truncation toward zero)."""
    if not bool((expanded.abs() < _MAX_COORD).all()):  # also catches NaN and inf
        raise ValueError(
            f"{fn}: boxes must be finite and less than 2**62 in magnitude once grown by the mask padding"
        )
    return expanded.to(torch.int64)


# --------------------------------------------------------------------------------------------
# Paste


def _grow_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Boxes scaled by ``scale`` about their centres, in the boxes' dtype and device.

    Every float op here is one that torchvision's ``expand_boxes`` makes, in the same order and
    dtype: the truncation to whole pixels that follows can flip on the last bit.
    """
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    half_w = half_w * scale
    half_h = half_h * scale
    return torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=1)


def _padding_scale(mask_size: int) -> float:
    """How much the padding grows a box: the padded mask spans (M + 2) / M of it."""
    return float(mask_size + 2 * _PADDING) / mask_size


def paste_boxes(boxes: Tensor, mask_size: int) -> Tensor:
    """The whole-pixel boxes that torchvision's ``paste_masks_in_image`` pastes M x M masks at.

    Args:
        boxes: Tensor[N, 4] of (x1, y1, x2, y2) floats in image pixels.
        mask_size: M, the side of the (unpadded) masks.

    Returns:
        Tensor[N, 4] int64 on the boxes' device: each box grown about its centre by (M + 2) / M
        (room for the one-pixel padding of the mask) and truncated toward zero. The padded mask
        is resized to cover pixels x0..x2 and y0..y2, both ends included.
    """
    fn = "paste_boxes"
    _check_boxes(boxes, fn)
    if isinstance(mask_size, bool) or not isinstance(mask_size, int) or mask_size <= 0:
        raise ValueError(f"{fn}: mask_size must be a positive int, got {mask_size!r}")
    return _pixel_boxes(_grow_boxes(boxes, _padding_scale(mask_size)), fn)


def paste_masks_to_rle(
    mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5
) -> tuple[list[dict], Tensor]:
    """Pastes each mask into its box, thresholds it and encodes it as COCO RLE of the full image.

    Args:
        mask_probs: Tensor[N, 1, M, M] or [N, M, M] of probabilities (the mask head's sigmoid
            output for each detection's class), any float dtype, any device.
        boxes: Tensor[N, 4] of (x1, y1, x2, y2) floats in the original image's pixels, on the
            same device.
        image_size: (height, width) of the original image.
        threshold: a pixel is foreground where its pasted probability is > threshold (>= 0).

    Returns:
        (rles, areas): rles is a list of N dicts ``{"size": [height, width], "counts": str}``,
        each exactly ``pycocotools.mask.encode(np.asfortranarray(dense))`` with its counts
        decoded to ASCII, where ``dense = paste_masks_in_image(masks, boxes, image_size)[i, 0]
        > threshold`` (torchvision's paste); areas is a CPU int64 Tensor[N] of foreground pixel
        counts (``pycocotools.mask.area``). A box that does not reach into the image gives an
        empty mask (torchvision raises for some of them; it never pastes anything there).

    On a GPU the resizing and thresholding stay on the device; what comes back is the grown
    boxes (N x 4) and, in one transfer, the thresholded pixels inside the image of every box.
    """
    fn = "paste_masks_to_rle"
    masks = _mask_batch(mask_probs, fn)
    _check_boxes(boxes, fn)
    if boxes.size(0) != masks.size(0):
        raise ValueError(f"{fn}: mask_probs and boxes must have the same N, got {masks.size(0)} and {boxes.size(0)}")
    if boxes.device != masks.device:
        raise ValueError(f"{fn}: boxes are on {boxes.device} but mask_probs is on {masks.device}")
    height, width = _image_size(image_size, fn)
    threshold = _threshold(threshold, fn)
    n = masks.size(0)
    if n == 0:
        return [], torch.zeros(0, dtype=torch.int64)

    with torch.no_grad():
        padded = F.pad(masks, (_PADDING,) * 4)
        # The float arithmetic on the boxes' device (as torchvision), the int conversion on the
        # host: truncation is exact on both, and Python ints are needed there anyway.
        grown = _grow_boxes(boxes, _padding_scale(masks.size(-1))).cpu()
        pixel_boxes = _pixel_boxes(grown, fn).tolist()

        # The part of each box inside the image, [x0, x1) x [y0, y1). Empty also for a reversed
        # box (bx1 < bx0), which torchvision resizes to one pixel and never pastes.
        shapes = np.zeros((n, 2), dtype=np.int64)  # (rows, columns) of each visible part
        origins = np.zeros((n, 2), dtype=np.int64)  # its (x0, y0) in the image
        for i, (bx0, by0, bx1, by1) in enumerate(pixel_boxes):
            x0, x1 = max(bx0, 0), min(bx1 + 1, width)
            y0, y1 = max(by0, 0), min(by1 + 1, height)
            if x1 > x0 and y1 > y0:
                shapes[i] = (y1 - y0, x1 - x0)
                origins[i] = (x0, y0)

        # Every visible part, thresholded, column-major with a zero after each column (no run
        # crosses a column or a box, which the encoder relies on), in one buffer that leaves
        # the device in one transfer.
        stride = shapes[:, 0] + 1
        ends = np.cumsum(stride * shapes[:, 1]).tolist()
        if masks.device.type == "cpu":
            flat = torch.from_numpy(np.zeros(ends[-1], dtype=bool))  # calloc'd: fresh zero pages
        else:
            flat = torch.zeros(ends[-1], dtype=torch.bool, device=masks.device)
        for i in np.flatnonzero(shapes[:, 0]).tolist():
            bx0, by0, bx1, by1 = pixel_boxes[i]
            (rows, cols), (x0, y0) = shapes[i].tolist(), origins[i].tolist()
            # A visible box has bx1 >= bx0 and by1 >= by0, so torchvision's max(size, 1) never
            # bites here. Resize the whole box, not just its visible part: the bilinear source
            # coordinates depend on the output size, and only this call reproduces them.
            resized = F.interpolate(padded[i : i + 1], size=(by1 - by0 + 1, bx1 - bx0 + 1), mode="bilinear", align_corners=False)
            visible = resized[0, 0, y0 - by0 : y0 - by0 + rows, x0 - bx0 : x0 - bx0 + cols]
            columns = flat[ends[i] - cols * (rows + 1) : ends[i]].view(cols, rows + 1)[:, :rows]
            torch.gt(visible.T, threshold, out=columns)
        flat = flat.cpu().numpy()

    counts, offsets, areas = _encode_packed(flat, shapes, origins, height, width)
    strings = _counts_to_strings(counts, offsets)
    return [{"size": [height, width], "counts": s} for s in strings], torch.from_numpy(areas)


# --------------------------------------------------------------------------------------------
# Box-local binary masks to RLE


def _encode_packed(
    flat: np.ndarray, shapes: np.ndarray, origins: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RLE counts of box-local masks packed column by column, each column followed by a 0.

    Args:
        flat: bool[sum(w * (h + 1))], mask i's columns (h pixels and a 0 each) after mask i-1's.
        shapes: int64[N, 2] of (h, w); origins: int64[N, 2] of (x0, y0) in the image, with the
            box inside it.

    Returns:
        (counts, offsets, areas): all masks' counts one after another, mask i's being
        counts[offsets[i]:offsets[i + 1]]; int64[N] areas.
    """
    n = len(shapes)
    total = height * width
    rows, cols = shapes[:, 0], shapes[:, 1]
    x0, y0 = origins[:, 0], origins[:, 1]
    stride = rows + 1  # a packed column, with its 0
    ends_of_masks = np.cumsum(stride * cols)
    starts_of_masks = ends_of_masks - stride * cols

    # Runs of ones in the packing, [start, stop): every other change of value, from a 0
    # before the buffer. Each lies in one column of one mask, thanks to the zero pads.
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if len(flat) and flat[0]:
        changes = np.concatenate(([0], changes))
    run_start, run_stop = changes[0::2], changes[1::2]

    # To the image's column-major indices (x * height + y); owner: the mask of each run.
    owner = np.searchsorted(ends_of_masks, run_start, side="right")
    local = run_start - starts_of_masks[owner]
    col, row = np.divmod(local, stride[owner])
    start = (x0[owner] + col) * height + y0[owner] + row
    stop = start + (run_stop - run_start)

    # A box spanning the image's height puts the bottom of one column next to the top of the
    # next: runs that touch are one run.
    joined = (stop[:-1] == start[1:]) & (owner[:-1] == owner[1:])
    if joined.any():
        start = start[np.concatenate(([True], ~joined))]
        stop = stop[np.concatenate((~joined, [True]))]
        owner = owner[np.concatenate(([True], ~joined))]

    areas = np.bincount(owner, weights=stop - start, minlength=n).astype(np.int64)
    runs = np.bincount(owner, minlength=n)
    first = np.ones(len(owner), dtype=bool)
    first[1:] = owner[1:] != owner[:-1]
    last = np.ones(len(owner), dtype=bool)
    last[:-1] = first[1:]

    # Counts of a mask: (zeros before run k, run k) for each run, then the zeros after the
    # last run unless there are none (pycocotools ends on the last nonempty run).
    previous_stop = np.concatenate(([0], stop[:-1]))
    previous_stop[first] = 0
    last_stop = np.zeros(n, dtype=np.int64)
    last_stop[owner[last]] = stop[last]
    trailing = total - last_stop
    lengths = 2 * runs + (trailing > 0)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    counts = np.empty(offsets[-1], dtype=np.int64)
    run_offsets = np.cumsum(runs) - runs
    where = offsets[owner] + 2 * (np.arange(len(owner)) - run_offsets[owner])
    counts[where] = start - previous_stop
    counts[where + 1] = stop - start
    tail = trailing > 0
    counts[offsets[1:][tail] - 1] = trailing[tail]
    return counts, offsets, areas


def _pack_masks(
    masks: Sequence[np.ndarray | Tensor], origins: Sequence[tuple[int, int]], image_size: Sequence[int], fn: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Checks the arguments of the box-mask encoders and packs the masks for _encode_packed."""
    height, width = _image_size(image_size, fn)
    arrays = [m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m) for m in masks]
    if len(origins) != len(arrays):
        raise ValueError(f"{fn}: masks and origins must have the same length, got {len(arrays)} and {len(origins)}")
    n = len(arrays)
    shapes = np.zeros((n, 2), dtype=np.int64)
    places = np.zeros((n, 2), dtype=np.int64)
    for i, (m, origin) in enumerate(zip(arrays, origins)):
        if m.ndim != 2:
            raise ValueError(f"{fn}: masks[{i}] must be 2-D (rows, columns), got shape {m.shape}")
        try:
            x, y = (operator.index(v) for v in origin)
        except (TypeError, ValueError):
            raise ValueError(f"{fn}: origins[{i}] must be a pair of ints (x0, y0), got {origin!r}") from None
        if x < 0 or y < 0 or x + m.shape[1] > width or y + m.shape[0] > height:
            raise ValueError(
                f"{fn}: masks[{i}] of shape {m.shape} at origins[{i}] = ({x}, {y}) is not inside "
                f"the {height} x {width} image"
            )
        shapes[i], places[i] = m.shape, (x, y)
    stride = shapes[:, 0] + 1
    ends = np.cumsum(stride * shapes[:, 1])
    flat = np.zeros(ends[-1] if n else 0, dtype=bool)
    for i, m in enumerate(arrays):
        h, w = m.shape
        flat[ends[i] - (h + 1) * w : ends[i]].reshape(w, h + 1)[:, :h] = m.T != 0
    return flat, shapes, places, height, width


def box_masks_to_rle_counts(
    masks: Sequence[np.ndarray | Tensor], origins: Sequence[tuple[int, int]], image_size: tuple[int, int]
) -> list[np.ndarray]:
    """Uncompressed COCO RLE counts of box-local binary masks placed in an image.

    Args:
        masks: 2-D arrays or tensors (rows, columns), nonzero = foreground; either side may be 0.
        origins: for each mask, the (x0, y0) of its top-left pixel in the image; the mask must
            lie inside the image (clip it first).
        image_size: (height, width) of the image.

    Returns:
        For each mask, int64 counts of the full image's mask, as pycocotools' ``encode`` makes
        them: column-major runs, alternately of zeros and ones, the first of zeros (maybe 0).
    """
    flat, shapes, places, height, width = _pack_masks(masks, origins, image_size, "box_masks_to_rle_counts")
    counts, offsets, _ = _encode_packed(flat, shapes, places, height, width)
    return [counts[offsets[i] : offsets[i + 1]] for i in range(len(shapes))]


def encode_box_masks(
    masks: Sequence[np.ndarray | Tensor], origins: Sequence[tuple[int, int]], image_size: tuple[int, int]
) -> tuple[list[dict], np.ndarray]:
    """Compressed COCO RLE of box-local binary masks placed in an image.

    Args: as ``box_masks_to_rle_counts``.

    Returns:
        (rles, areas): for each mask ``{"size": [height, width], "counts": str}``, equal to
        pycocotools' ``encode`` of the full-image mask (counts as ASCII), and int64 areas.
    """
    flat, shapes, places, height, width = _pack_masks(masks, origins, image_size, "encode_box_masks")
    counts, offsets, areas = _encode_packed(flat, shapes, places, height, width)
    return [{"size": [height, width], "counts": s} for s in _counts_to_strings(counts, offsets)], areas


# --------------------------------------------------------------------------------------------
# Counts to pycocotools' string


def _counts_to_strings(counts: np.ndarray, offsets: np.ndarray) -> list[str]:
    """pycocotools' ``rleToString`` of many count lists at once: counts[offsets[i]:offsets[i+1]]."""
    counts = counts.astype(np.int64, copy=False)
    # From the fourth count of a list on, the code is of the change from the count two before
    # (a run of the same value), usually a small number: subtract everywhere, then put the
    # first three of each list back.
    values = counts.copy()
    values[2:] -= counts[:-2]
    heads = (offsets[:-1, None] + np.arange(3)).ravel()
    heads = heads[heads < np.repeat(offsets[1:], 3)]
    values[heads] = counts[heads]

    # Characters per value: k 5-bit groups hold the values in [-2**(5k-1), 2**(5k-1)).
    chars = np.ones(len(values), dtype=np.int64)
    rest = values >> 4
    while True:
        wider = (rest != 0) & (rest != -1)
        if not wider.any():
            break
        chars += wider
        rest >>= 5
    char_ends = np.cumsum(chars)
    char_starts = char_ends - chars

    # Group k of every value that has one, low group first; 0x20 while more follow. The shift
    # is arithmetic, so a negative change keeps its sign bits.
    text = np.empty(char_ends[-1] if len(chars) else 0, dtype=np.uint8)
    have = np.arange(len(values))
    for k in range(int(chars.max()) if len(chars) else 0):
        if k:
            have = have[chars[have] > k]
        text[char_starts[have] + k] = ((values[have] >> (5 * k)) & 0x1F) + 48 + ((chars[have] > k + 1) << 5)
    decoded = text.tobytes().decode("ascii")

    bounds = np.concatenate(([0], char_ends))[offsets]  # each list's characters
    return [decoded[bounds[i] : bounds[i + 1]] for i in range(len(offsets) - 1)]


def rle_counts_to_string(counts: Sequence[int] | np.ndarray | Tensor) -> str:
    """pycocotools' compressed string of uncompressed RLE counts (its ``rleToString``).

    Args:
        counts: run lengths, integers in [0, 2**32) (pycocotools stores them as unsigned ints).

    Returns:
        The ASCII string that ``pycocotools.mask.frPyObjects`` gives for ``{"counts": counts}``.
    """
    fn = "rle_counts_to_string"
    if isinstance(counts, Tensor):
        counts = counts.detach().cpu().numpy()
    array = np.asarray(counts)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{fn}: counts must be a 1-D sequence of ints, got {array.dtype} of shape {array.shape}")
    if array.size and (int(array.min()) < 0 or int(array.max()) > _MAX_COUNT):
        raise ValueError(f"{fn}: counts must be in [0, 2**32), got values in [{array.min()}, {array.max()}]")
    array = array.astype(np.int64)
    return _counts_to_strings(array, np.array([0, len(array)], dtype=np.int64))[0]
