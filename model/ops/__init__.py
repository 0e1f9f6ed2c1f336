"""The RoI operators of Mask R-CNN, compiled in csrc/ (C++ for the CPU, CUDA for the GPU).

``roi_align`` and ``roi_pool`` mean exactly what ``torchvision.ops`` means by them. They are
registered as ``torch.ops.maskray.*`` with autograd, fake kernels (``torch.compile`` and
``torch.export`` trace through them) and autocast (they run in float32 under autocast).
"""

from maskray.model.ops._library import has_cuda_kernels
from maskray.model.ops.poolers import MultiScaleRoIAlign, MultiScaleRoIPool
from maskray.model.ops.roi_align import RoIAlign, roi_align
from maskray.model.ops.roi_pool import RoIPool, roi_pool

__all__ = [
    "MultiScaleRoIAlign",
    "MultiScaleRoIPool",
    "RoIAlign",
    "RoIPool",
    "has_cuda_kernels",
    "roi_align",
    "roi_pool",
]
