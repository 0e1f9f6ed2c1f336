"""The compiled RoI operators against torchvision.ops on random inputs: forward and input
gradient of roi_align (aligned and not, fixed and adaptive sampling) and roi_pool, in both
layouts, on every device that has kernels. ``maskray selfcheck`` prints the result."""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torchvision

from maskray.model.ops._library import has_cuda_kernels
from maskray.model.ops.roi_align import roi_align
from maskray.model.ops.roi_pool import roi_pool

TOLERANCE = 1e-4  # float32; the kernels do torchvision's arithmetic, so differences are rounding


@dataclass
class Check:
    device: str
    case: str
    layout: str
    output_difference: float  # max |ours - torchvision|
    gradient_difference: float

    @property
    def ok(self) -> bool:
        return self.output_difference <= TOLERANCE and self.gradient_difference <= TOLERANCE


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available() and has_cuda_kernels():
        found.append(torch.device("cuda"))
    return found


def _inputs(seed: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    feature = torch.randn(2, 32, 48, 64, generator=generator)
    # Image coordinates at stride 4, some boxes reaching past the map's edge.
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([256.0, 192.0])
    wh = torch.rand(count, 2, generator=generator) * 160 + 1
    index = torch.randint(0, 2, (count, 1), generator=generator).float()
    rois = torch.cat([index, xy, xy + wh], dim=1)
    return feature.to(device), rois.to(device)


def _differences(ours, theirs, feature: torch.Tensor, layout: torch.memory_format) -> tuple[float, float]:
    x_ours = feature.clone(memory_format=layout).requires_grad_()
    x_theirs = feature.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    grad = torch.randn_like(out_theirs)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    return (out_ours - out_theirs).abs().max().item(), (x_ours.grad - x_theirs.grad).abs().max().item()


def run_checks(seed: int = 0, boxes: int = 64) -> Iterator[Check]:
    """One Check per device, case and layout."""
    for device in devices():
        feature, rois = _inputs(seed, boxes, device)
        cases = {
            "roi_align 7x7 aligned": (
                lambda x, rois=rois: roi_align(x, rois, 7, 0.25, 2, True),
                lambda x, rois=rois: torchvision.ops.roi_align(x, rois, 7, 0.25, 2, True),
            ),
            "roi_align 14x14 adaptive": (
                lambda x, rois=rois: roi_align(x, rois, 14, 0.25, -1, False),
                lambda x, rois=rois: torchvision.ops.roi_align(x, rois, 14, 0.25, -1, False),
            ),
            "roi_pool 7x7": (
                lambda x, rois=rois: roi_pool(x, rois, 7, 0.25),
                lambda x, rois=rois: torchvision.ops.roi_pool(x, rois, 7, 0.25),
            ),
        }
        for case, (ours, theirs) in cases.items():
            for layout, name in ((torch.contiguous_format, "contiguous"), (torch.channels_last, "channels_last")):
                yield Check(device.type, case, name, *_differences(ours, theirs, feature, layout))
