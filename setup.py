"""Builds maskray's compiled RoI operators (csrc/) as the extension `maskray.model._C`.

CPU kernels are always built; CUDA kernels when torch sees a GPU and nvcc is
present, or when MASKRAY_FORCE_CUDA=1 (building a GPU image on a machine
without a GPU). MASKRAY_FORCE_CUDA=0 builds the CPU kernels only.

The build happens at install time, never on first import, so there is no
lock file that an interrupted build could leave behind.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    forced = os.environ.get("MASKRAY_FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.cuda.is_available() and CUDA_HOME is not None


def _cuda_wheel_includes() -> list[str]:
    """CUDA library headers (cusparse.h, ...) that torch's CUDA headers include.

    With torch's pip wheels they ship in the nvidia-* packages, not in CUDA_HOME.
    """
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(p for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "cu*", "include")))


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autocast/*.cpp"))
    # abi3: one wheel serves every Python >= 3.10 (module.cpp uses only the limited API).
    # -g0: Python's own flags ask for debug info, which makes the library 20 times larger (11 MB).
    cxx = ["-O3", "-g0", "-DPy_LIMITED_API=0x030A0000"]
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is OpenMP in torch's builds. The extension links
        # libgomp.so.1 by soname, which resolves to the copy torch has already
        # loaded, so both share one thread pool and torch.set_num_threads.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    kwargs = dict(
        name="maskray.model._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=link,
        py_limited_api=True,
    )
    if _want_cuda():
        if not torch.cuda.is_available():
            # No GPU to read the architecture from: build for the common data-centre
            # and workstation ones, with PTX that newer GPUs compile at load time.
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;8.6;8.9;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["include_dirs"] += _cuda_wheel_includes()
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-DPy_LIMITED_API=0x030A0000"]
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
