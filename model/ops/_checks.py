"""Argument checks and conversions shared by the Python faces of the RoI ops."""

from collections.abc import Sequence

import torch
from torch import Tensor


def check_input(input: Tensor, op: str) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{op}: input must be a 4-D tensor (N, C, H, W), got shape {tuple(input.shape)}")


def output_pair(output_size: int | Sequence[int], op: str) -> tuple[int, int]:
    """(height, width) from an int or a pair, both positive."""
    if isinstance(output_size, int):
        pair = (output_size, output_size)
    elif isinstance(output_size, Sequence) and len(output_size) == 2:
        pair = (int(output_size[0]), int(output_size[1]))
    else:
        raise ValueError(f"{op}: output_size must be an int or a pair (height, width), got {output_size!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{op}: output_size must be positive, got {output_size!r}")
    return pair


def rois_from_boxes(boxes: Tensor | Sequence[Tensor], input: Tensor, op: str) -> Tensor:
    """The op's Tensor[K, 5] (batch_index, x1, y1, x2, y2) from either accepted form of boxes.

    A list holds one Tensor[L, 4] of xyxy boxes per image of the batch, in order.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            hint = " (for the boxes of one image, pass a list: [boxes])" if boxes.dim() == 2 and boxes.size(1) == 4 else ""
            raise ValueError(
                f"{op}: boxes as a Tensor must have shape [K, 5] (batch_index, x1, y1, x2, y2), "
                f"got {tuple(boxes.shape)}{hint}"
            )
        rois = boxes
    elif isinstance(boxes, Sequence) and all(isinstance(b, Tensor) for b in boxes):
        for i, b in enumerate(boxes):
            if b.dim() != 2 or b.size(1) != 4:
                raise ValueError(f"{op}: boxes[{i}] must have shape [L, 4] (x1, y1, x2, y2), got {tuple(b.shape)}")
        if len(boxes) == 0:
            return input.new_empty((0, 5))
        concat = torch.cat(list(boxes), dim=0)
        index = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
        rois = torch.cat([index, concat], dim=1)
    else:
        raise TypeError(f"{op}: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if rois.device != input.device:
        raise ValueError(f"{op}: boxes are on {rois.device} but input is on {input.device}")
    return rois


def layout_of(t: Tensor) -> torch.memory_format:
    """The layout rule of the kernels (csrc/layout.h): channels_last stays channels_last."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_rois(input: Tensor, rois: Tensor, op: str) -> None:
    """Shape and dtype checks of the raw op, for the fake kernels (the C++ kernels make the same)."""
    torch._check(input.dim() == 4, lambda: f"{op}: input must be a 4-D tensor (N, C, H, W), got {input.dim()}-D")
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5,
        lambda: f"{op}: rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}",
    )
    torch._check(
        input.dtype == rois.dtype,
        lambda: f"{op}: input and rois must have the same dtype, got input {input.dtype} and rois {rois.dtype}",
    )
