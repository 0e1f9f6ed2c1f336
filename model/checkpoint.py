"""Checkpoints: one file holding config, class names, weights and versions.

Written with ``torch.save`` and read with ``torch.load(weights_only=True)``: the file holds
only tensors and plain data, so loading it cannot run code. A file that would need pickled
code to load is refused with an error that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
import torchvision
from torch import Tensor

from maskray.model.config import MaskRCNNConfig

if TYPE_CHECKING:
    from maskray.model.mask_rcnn import MaskRCNN

FORMAT = "maskray.checkpoint"
FORMAT_VERSION = 1


def _describe(source: object) -> str:
    return str(source) if isinstance(source, (str, Path)) else getattr(source, "name", type(source).__name__)


def safe_load(source: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; errors name the file."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise ValueError(
            f"{_describe(source)}: not a loadable weights file ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        maskray = version("maskray")
    except PackageNotFoundError:
        maskray = "unknown"
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    return {"maskray": str(maskray), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


# Dtypes a checkpoint may store its floating-point weights in; they are float32 again on loading.
WEIGHTS_DTYPES = ("float32", "float16", "bfloat16")


def save_checkpoint(
    model: MaskRCNN, path: str | Path | BinaryIO, weights_dtype: str = "float32", **extra: Any
) -> None:
    """Writes ``model``'s checkpoint; ``extra`` holds more plain data (e.g. training state).

    ``weights_dtype="float16"`` (or ``"bfloat16"``) stores the floating-point tensors at half
    the size, for shipping a model; the file says so (``weights_dtype``) and loading casts them
    back to float32. A weight beyond float16's range is an error, never an infinity on disk.
    """
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
    dtype = getattr(torch, weights_dtype)
    state_dict = {}
    for name, tensor in model.state_dict().items():
        # contiguous(): channels_last weights would be saved with their strides; keep files plain.
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.is_floating_point() and tensor.dtype != dtype:
            stored = tensor.to(dtype)
            if torch.isfinite(tensor).all() and not torch.isfinite(stored).all():
                raise ValueError(f"{name} has values beyond {weights_dtype}'s range; save it as float32 or bfloat16")
            tensor = stored
        state_dict[name] = tensor
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "class_names": list(model.config.class_names),
        "state_dict": state_dict,
        "weights_dtype": weights_dtype,
        "versions": versions(),
        **extra,
    }
    torch.save(state, path)


def float32_state_dict(state: dict[str, Any]) -> dict[str, Tensor]:
    """A checkpoint's weights as the model holds them: float32, whatever they were stored in."""
    if state.get("weights_dtype", "float32") == "float32":
        return state["state_dict"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state["state_dict"].items()}


def is_maskray_checkpoint(state: Any) -> bool:
    """Whether a loaded weights file is one of ours (``save_checkpoint``'s), not e.g. a torchvision state dict."""
    return isinstance(state, dict) and state.get("format") == FORMAT


def checked_checkpoint(state: Any, source: object = "checkpoint") -> dict[str, Any]:
    """``state`` (a loaded file) if it is a maskray checkpoint of a format this maskray reads;
    ValueError naming ``source`` (a path, a named file or a label) if not."""
    if not is_maskray_checkpoint(state):
        raise ValueError(f"{_describe(source)}: not a maskray checkpoint (for a torchvision state dict use "
                         "MaskRCNN.from_torchvision)")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{_describe(source)}: checkpoint format {state['format_version']} is newer than this "
                         "maskray reads")
    return state


def model_from_state(state: Any, source: object = "checkpoint") -> MaskRCNN:
    """The model (eval mode, inference layout) of an already loaded maskray checkpoint; ``source``
    names it in errors. ``MaskRCNN.load`` and the jobs' weights reader both build models here."""
    from maskray.model.mask_rcnn import MaskRCNN

    state = checked_checkpoint(state, source)
    model = MaskRCNN(MaskRCNNConfig.from_dict(state["config"]))
    model.load_state_dict(float32_state_dict(state))
    return model.eval().to_inference_layout()


def read_torchvision_state_dict(source: dict[str, Tensor] | str | Path | BinaryIO) -> dict[str, Tensor]:
    """A torchvision Mask R-CNN state dict, from memory or a file, with its keys checked."""
    state_dict = source if isinstance(source, dict) else safe_load(source)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{_describe(source)}: expected a state dict, got {type(state_dict).__name__}")
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]  # torchvision's reference scripts wrap it
    if "roi_heads.box_predictor.cls_score.weight" not in state_dict or "backbone.body.conv1.weight" not in state_dict:
        raise ValueError(
            f"{_describe(source)}: not a torchvision maskrcnn_resnet50_fpn state dict "
            "(no backbone.body.conv1.weight / roi_heads.box_predictor.cls_score.weight)"
        )
    return dict(state_dict)

