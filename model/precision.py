"""Inference precision: which dtype the model's convolutions and linear layers run in.

One rule for every command (``--precision`` of segment, evaluate and train) and for
``MaskRCNNConfig.precision``:

- ``fp32``: float32 throughout.
- ``bf16`` / ``fp16``: autocast to bfloat16 / float16. What decides a result stays in float32
  wherever it runs: box decoding (maskray.model.box_coder), the class scores (a float32
  softmax), the mask probabilities and their threshold, and the RoI ops (their autocast policy).
- ``auto``: on a GPU, ``config.cuda_autocast`` (float16 unless the config says otherwise, what
  maskray has always run); on a CPU, bfloat16 where the CPU has it natively (AVX512-BF16 or
  AMX), where it measured several times faster for the R50-FPN models with the demo model's
  held-out AP unchanged (BENCHMARKS.md), and float32 elsewhere, where bfloat16 is emulated and
  slower.

``None`` (the config's default) is what a model did before the switch existed: float32 on a
CPU, ``cuda_autocast`` on a GPU, so that a checkpoint or a torchvision state dict loaded from
Python gives the float32 detections that the parity tests pin.
"""

from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FROM_DTYPE_NAME = {"bfloat16": "bf16", "float16": "fp16", None: "fp32"}


def _check(precision: str) -> None:
    # The wording of maskray.pipeline.options.check_precision, which the commands use without torch.
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), as oneDNN uses it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve(precision: str | None, device: torch.device | str, cuda_autocast: str | None = "float16") -> str:
    """The precision that runs (``fp32``, ``bf16`` or ``fp16``) for ``precision`` on ``device``."""
    if precision is not None:
        _check(precision)
    device_type = torch.device(device).type
    if precision in ("fp32", "bf16", "fp16"):
        return precision
    if device_type == "cuda":
        return _FROM_DTYPE_NAME[cuda_autocast]
    if precision == "auto" and device_type == "cpu" and cpu_has_native_bfloat16():
        return "bf16"
    return "fp32"


def resolve_for_training(precision: str, device: torch.device | str) -> str:
    """The autocast precision of training's forward pass: ``auto`` is float16 (with loss scaling) on
    a GPU, as before the switch, and float32 on a CPU (the bfloat16 measurements are of inference)."""
    _check(precision)
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast region of a resolved ``precision`` (from :func:`resolve`) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
