"""Loads the compiled operators (csrc/, built as ``maskray.model._C``) into ``torch.ops.maskray``."""

import torch  # noqa: F401  (loads libtorch and its libgomp before our library)

try:
    from maskray.model import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "maskray's compiled RoI operators (maskray.model._C) are not built or do not match the installed "
        "torch. Build them with `pip install --no-build-isolation -e .` (or `make setup`) in the "
        f"maskray checkout, after torch is installed. The import failed with: {error}"
    ) from error


def has_cuda_kernels() -> bool:
    """Whether this build of the operators includes the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("maskray::roi_align", "CUDA")
