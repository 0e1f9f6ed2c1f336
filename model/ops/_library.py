"""Loads the compiled operators (csrc/, built as ``model._C``) into ``torch.ops.maskray``."""

import torch  # noqa: F401  (loads libtorch and its libgomp before our library)

import importlib.util
import sys
from pathlib import Path


def _installed_build() -> Path | None:
    """An installed maskray's ``model/_C*`` elsewhere on sys.path than this package.

    A source tree without its build can shadow an installed maskray: Ray's ``--working-dir``
    uploads the checkout (skipping what .gitignore lists, the built library among it) and
    puts it first on the nodes' path, while the nodes' image has the wheel installed.
    """
    here = Path(__file__).resolve().parents[1]
    for entry in sys.path:
        candidate = Path(entry or ".") / "model"
        if candidate.resolve() == here or not candidate.is_dir():
            continue
        for build in sorted(candidate.glob("_C*.so")) + sorted(candidate.glob("_C*.pyd")):
            return build
    return None


try:
    from model import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)
except ImportError as error:  # pragma: no cover - only without a build
    build = _installed_build()
    if build is None:
        raise ImportError(
            "maskray's compiled RoI operators (model._C) are not built or do not match the installed "
            "torch. Build them with `pip install --no-build-isolation -e .` (or `make setup`) in the "
            f"maskray checkout, after torch is installed. The import failed with: {error}"
        ) from error
    spec = importlib.util.spec_from_file_location("model._C", build)
    _C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_C)
    sys.modules["model._C"] = _C


def has_cuda_kernels() -> bool:
    """Whether this build of the operators includes the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("maskray::roi_align", "CUDA")
