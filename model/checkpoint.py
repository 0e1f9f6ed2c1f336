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

from model.config import MaskRCNNConfig

if TYPE_CHECKING:
    from model.mask_rcnn import MaskRCNN

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


def save_checkpoint(model: MaskRCNN, path: str | Path | BinaryIO, **extra: Any) -> None:
    """Writes ``model``'s checkpoint; ``extra`` holds more plain data (e.g. training state)."""
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "class_names": list(model.config.class_names),
        # contiguous(): channels_last weights would be saved with their strides; keep files plain.
        "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()},
        "versions": versions(),
        **extra,
    }
    torch.save(state, path)


def load_checkpoint(path: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> MaskRCNN:
    """A model in eval mode from a maskray checkpoint."""
    from model.mask_rcnn import MaskRCNN

    state = safe_load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{_describe(path)}: not a maskray checkpoint (for a torchvision state dict use MaskRCNN.from_torchvision)"
        )
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{_describe(path)}: checkpoint format {state['format_version']} is newer than this maskray reads")
    config = MaskRCNNConfig.from_dict(state["config"])
    model = MaskRCNN(config)
    model.load_state_dict(state["state_dict"])
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

