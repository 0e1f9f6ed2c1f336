"""RoIPool: the Python face of ``torch.ops.maskray.roi_pool``, its autograd formula and fake kernel."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskray.model.ops import _library  # noqa: F401  (registers the compiled op)
from maskray.model.ops._checks import check_input, check_rois, layout_of, output_pair, rois_from_boxes


def roi_pool(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Region of Interest (RoI) Pool, as in Fast R-CNN: exactly ``torchvision.ops.roi_pool``.

    Each box is rounded to whole feature cells (``round(coordinate * spatial_scale)``), divided
    into ``output_size`` bins whose edges are rounded down and up to whole cells, and each bin
    is max-pooled. These two quantisations are what RoIAlign removes. A bin that falls outside
    the feature map pools to 0.

    Args: as :func:`model.ops.roi_align`, without ``sampling_ratio`` and ``aligned``.

    Returns:
        Tensor[K, C, output_size[0], output_size[1]], channels_last when the input is.
    """
    check_input(input, "roi_pool")
    rois = rois_from_boxes(boxes, input, "roi_pool")
    height, width = output_pair(output_size, "roi_pool")
    output, _ = torch.ops.maskray.roi_pool(input, rois, float(spatial_scale), height, width)
    return output


# An FX leaf, as in torchvision: symbolic_trace records one call instead of tracing the argument checks.
torch.fx.wrap("roi_pool")


class RoIPool(nn.Module):
    """``roi_pool`` as a module; see :func:`roi_pool`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float):
        super().__init__()
        self.output_size = output_pair(output_size, "RoIPool")
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


@torch.library.register_fake("maskray::roi_pool")
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    check_rois(input, rois, "roi_pool")
    shape = (rois.size(0), input.size(1), pooled_height, pooled_width)
    layout = layout_of(input)
    output = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=layout)
    argmax = torch.empty(shape, dtype=torch.int32, device=input.device, memory_format=layout)
    return output, argmax


@torch.library.register_fake("maskray::_roi_pool_backward")
def _roi_pool_backward_fake(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width):
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device, memory_format=layout_of(grad))


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    _, argmax = output
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(rois, argmax)
    ctx.input_shape = input.shape
    ctx.arguments = (spatial_scale, pooled_height, pooled_width)


def _backward(ctx, grad, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width = ctx.arguments
    batch_size, channels, height, width = ctx.input_shape
    grad_input = torch.ops.maskray._roi_pool_backward(
        grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width
    )
    return grad_input, None, None, None, None


torch.library.register_autograd("maskray::roi_pool", _backward, setup_context=_setup_context)
