"""RoIAlign: the Python face of ``torch.ops.maskray.roi_align``, its autograd formula and fake kernel."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskray.model.ops import _library  # noqa: F401  (registers the compiled op)
from maskray.model.ops._checks import check_input, check_rois, layout_of, output_pair, rois_from_boxes


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Region of Interest (RoI) Align, as in Mask R-CNN: exactly ``torchvision.ops.roi_align``.

    Each box is divided into ``output_size`` bins; each bin's value is the average of
    bilinearly interpolated samples on a regular grid inside it, with no quantisation of the
    box or the bins (the difference from RoIPool).

    Args:
        input: features, Tensor[N, C, H, W] (contiguous or channels_last; float16, bfloat16,
            float32 or float64).
        boxes: in input-image coordinates (x1, y1, x2, y2), either a Tensor[K, 5] whose first
            column is the batch index, or a list of Tensor[L, 4], one per image of the batch.
            Same dtype and device as ``input`` (autocast casts both to float32).
        output_size: (height, width) of the pooled output, or one int for both.
        spatial_scale: maps box coordinates to the feature map, e.g. 1/4 for a stride-4 level.
        sampling_ratio: samples per bin along each axis; ``<= 0`` means adaptive,
            ``ceil(bin size)`` samples per axis.
        aligned: if True, shift box coordinates by -0.5 so that a box edge at pixel i falls
            at the centre of feature cell i (Detectron2's pixel model). If False (the legacy
            behaviour), boxes smaller than one cell are enlarged to one cell.

    Returns:
        Tensor[K, C, output_size[0], output_size[1]], channels_last when the input is.
        Samples outside the feature map count as zeros in the average.
    """
    check_input(input, "roi_align")
    rois = rois_from_boxes(boxes, input, "roi_align")
    height, width = output_pair(output_size, "roi_align")
    return torch.ops.maskray.roi_align(
        input, rois, float(spatial_scale), height, width, int(sampling_ratio), bool(aligned)
    )


# An FX leaf, as in torchvision: symbolic_trace records one call instead of tracing the argument checks.
torch.fx.wrap("roi_align")


class RoIAlign(nn.Module):
    """``roi_align`` as a module; see :func:`roi_align`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_pair(output_size, "RoIAlign")
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


@torch.library.register_fake("maskray::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    check_rois(input, rois, "roi_align")
    shape = (rois.size(0), input.size(1), pooled_height, pooled_width)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=layout_of(input))


@torch.library.register_fake("maskray::_roi_align_backward")
def _roi_align_backward_fake(
    grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio, aligned
):
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device, memory_format=layout_of(grad))


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = input.shape
    ctx.arguments = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.arguments
    batch_size, channels, height, width = ctx.input_shape
    grad_input = torch.ops.maskray._roi_align_backward(
        grad, rois, spatial_scale, pooled_height, pooled_width,
        batch_size, channels, height, width, sampling_ratio, aligned,
    )
    # Like torchvision, no gradient flows to the box coordinates.
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd("maskray::roi_align", _backward, setup_context=_setup_context)
