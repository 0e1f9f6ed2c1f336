"""Checkpoints: one file holding config, class names, weights and versions.

Written with ``torch.save`` and read with ``torch.load(weights_only=True)``: the file holds
only tensors and plain data, so loading it cannot run code. A file that does not load that
way is refused with one line that names it and says what it is (an image, a text page, a
truncated download, a whole pickled model, ...), never torch's advice to load it unsafely.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
import torchvision
from torch import Tensor

from maskray.model.config import MaskRCNNConfig
from maskray.model.refused_files import printable, shorten, what_is

if TYPE_CHECKING:
    from maskray.model.mask_rcnn import MaskRCNN

FORMAT = "maskray.checkpoint"
FORMAT_VERSION = 1


def _describe(source: object) -> str:
    return str(source) if isinstance(source, (str, Path)) else getattr(source, "name", type(source).__name__)


def safe_load(source: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a file it refuses is a ValueError naming the file
    and saying what it is (``maskray.model.refused_files``)."""
    try:
        with warnings.catch_warnings():
            # torch warns about a foreign pickle or a TorchScript zip before refusing it: the refusal says it all.
            warnings.filterwarnings("ignore", "Detected pickle protocol|.*looks like a TorchScript archive")
            return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        # from None: torch's own text (kept in __cause__ otherwise) advises turning weights_only off.
        raise ValueError(f"{_describe(source)}: not a loadable weights file: {what_is(source, error)}") from None


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
    if not (isinstance(state.get("config"), dict) and isinstance(state.get("state_dict"), dict)):
        raise ValueError(  # noqa: TRY004 - a wrong file is a user error, a ValueError
            f"{_describe(source)}: a maskray checkpoint without its config or state_dict (damaged?)")
    return state


def model_from_state(state: Any, source: object = "checkpoint") -> MaskRCNN:
    """The model (eval mode, inference layout) of an already loaded maskray checkpoint; ``source``
    names it in errors. ``MaskRCNN.load`` and the jobs' weights reader both build models here."""
    from maskray.model.mask_rcnn import MaskRCNN

    state = checked_checkpoint(state, source)
    try:
        config = MaskRCNNConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{_describe(source)}: its config does not fit this maskray ({error})") from None
    model = MaskRCNN(config)
    try:
        model.load_state_dict(float32_state_dict(state))
    except RuntimeError as error:
        misfit = describe_misfit(error)
        if misfit is None:
            raise
        raise ValueError(f"{_describe(source)}: its state_dict does not fit its config: {misfit}") from None
    return model.eval().to_inference_layout()


def describe_misfit(error: RuntimeError) -> str | None:
    """``load_state_dict``'s refusal (a multi-line dump of every key) in one short line: how many keys are
    missing, unexpected or of another shape, with the first names; None for any other RuntimeError."""
    text = str(error)
    if not text.startswith("Error(s) in loading state_dict"):
        return None
    found: dict[str, list[str]] = {"missing": [], "unexpected": [], "of another shape": [], "other problems": []}
    for line in (line.strip() for line in text.splitlines()[1:]):
        reshaped = re.match(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", line)
        if line.startswith("Missing key(s)"):
            found["missing"] += re.findall(r'"([^"]+)"', line)
        elif line.startswith("Unexpected key(s)"):
            found["unexpected"] += re.findall(r'"([^"]+)"', line)
        elif reshaped:
            found["of another shape"].append(f"{reshaped[1]} {reshaped[2]}, the model's {reshaped[3]}")
        elif line:
            found["other problems"].append(shorten(line, 80))
    shown = {"missing": 2, "unexpected": 2, "of another shape": 1, "other problems": 1}
    return "; ".join(f"{len(names)} {kind} ({', '.join(names[: shown[kind]])}{', ...' if len(names) > shown[kind] else ''})"
                     for kind, names in found.items() if names)


def read_torchvision_state_dict(
    source: dict[str, Tensor] | str | Path | BinaryIO, name: object = None
) -> dict[str, Tensor]:
    """A torchvision Mask R-CNN state dict, from memory or a file, with its keys checked; errors name
    ``name`` (e.g. the file an in-memory dict came from) or else ``source``."""
    state_dict = source if isinstance(source, dict) else safe_load(source)
    name = _describe(source if name is None else name)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{name}: expected a state dict, got {type(state_dict).__name__}")  # noqa: TRY004
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]  # torchvision's reference scripts wrap it
    if any(key not in state_dict for key in _TORCHVISION_KEYS) or any(
        isinstance(key, str) and key.startswith(_KEYPOINT_HEAD) for key in state_dict
    ):
        raise ValueError(f"{name}: not a torchvision maskrcnn_resnet50_fpn state dict: "
                         f"{describe_state_dict(state_dict)}")
    return dict(state_dict)


def _count(state_dict: dict, key: str) -> int:
    """How many of ``key.format(0)``, ``key.format(1)``, ... the state dict has, in a row."""
    n = 0
    while key.format(n) in state_dict:
        n += 1
    return n


def torchvision_layout(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """The config fields that a torchvision Mask R-CNN state dict's keys fix: which parts it has
    (v1's or v2's, a mask head or not). Keys of older torchvision (rpn.head.conv.weight) count as v1's."""
    layout: dict[str, Any] = {
        "mask": "roi_heads.mask_predictor.mask_fcn_logits.weight" in state_dict,
        # v2's FPN convs are followed by a BatchNorm: inner_blocks.0.1.* is it.
        "fpn_norm": "batch" if "backbone.fpn.inner_blocks.0.1.weight" in state_dict else "none",
        "rpn_head_convs": _count(state_dict, "rpn.head.conv.{}.0.weight") or 1,
        "box_head_convs": _count(state_dict, "roi_heads.box_head.{}.0.weight"),
    }
    head_norms = {key for key in ("roi_heads.box_head.0.1.weight", "roi_heads.mask_head.0.1.weight") if key in state_dict}
    if layout["box_head_convs"] or layout["mask"]:  # otherwise no head has convs to follow
        layout["head_norm"] = "batch" if head_norms else "none"
    return layout


def torchvision_config(state_dict: dict[str, Tensor]) -> MaskRCNNConfig:
    """The config that builds a torchvision state dict's model: v1's or v2's preset with the parts
    its keys show, its number of classes, and COCO's class names when there are 91."""
    num_classes = state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0]
    layout = torchvision_layout(state_dict)
    v1 = (layout["fpn_norm"], layout["rpn_head_convs"], layout["box_head_convs"]) == ("none", 1, 0)
    preset = MaskRCNNConfig.resnet50_fpn if v1 else MaskRCNNConfig.resnet50_fpn_v2
    return preset(num_classes, _coco_names(num_classes)).replace(**layout)


def _coco_names(num_classes: int) -> tuple[str, ...]:
    if num_classes != 91:
        return ()
    from torchvision.models._meta import _COCO_CATEGORIES

    return tuple("__background__" if i == 0 else name for i, name in enumerate(_COCO_CATEGORIES))


def torchvision_name(layout: dict[str, Any]) -> str:
    """The torchvision builder of a :func:`torchvision_layout`'s model, e.g. ``maskrcnn_resnet50_fpn_v2``."""
    v2 = layout["rpn_head_convs"] == 2 and layout["box_head_convs"] == 4 and layout["fpn_norm"] == "batch"
    v1 = layout["rpn_head_convs"] == 1 and layout["box_head_convs"] == 0 and layout["fpn_norm"] == "none"
    kind = "maskrcnn" if layout["mask"] else "fasterrcnn"
    return f"{kind}_resnet50_fpn{'_v2' if v2 else ''}" if v1 or v2 else f"{kind}_resnet50_fpn-like"


def check_layout(config: MaskRCNNConfig, state_dict: dict[str, Tensor], name: object = "state dict") -> None:
    """ValueError in one line when ``config`` builds other parts than the state dict holds
    (e.g. v1's for v2's weights), naming the fields that differ."""
    layout = torchvision_layout(state_dict)
    differ = [f"{field}={getattr(config, field)!r} (the weights': {value!r})"
              for field, value in layout.items() if getattr(config, field) != value]
    if differ:
        hint = "MaskRCNNConfig.resnet50_fpn_v2()" if "_v2" in torchvision_name(layout) else "MaskRCNNConfig.resnet50_fpn()"
        raise ValueError(f"{_describe(name)}: {torchvision_name(layout)} weights, but the config builds other parts: "
                         f"{', '.join(differ)}; use {hint} or no config")


# Keys that every torchvision maskrcnn_resnet50_fpn state dict has (fasterrcnn_resnet50_fpn's too: a Faster R-CNN).
_TORCHVISION_KEYS = ("backbone.body.conv1.weight", "roi_heads.box_predictor.cls_score.weight")
# A Keypoint R-CNN's state dict has those keys too, and more that no Mask R-CNN takes.
_KEYPOINT_HEAD = "roi_heads.keypoint_"
# (a key's start, what a state dict with such keys looks like, advice), the first that matches.
_LOOKS_LIKE = ((_KEYPOINT_HEAD, "a Keypoint R-CNN", ", which maskray does not build"),
               ("module.", "a DataParallel-wrapped model", "; save model.module.state_dict() instead"),
               ("backbone.bottom_up.", "a Detectron2 model", ""),
               ("head.classification_head.", "a RetinaNet or FCOS detector", ""),
               ("backbone.body.", "a detector with another backbone", ""),
               ("fc.", "an image classifier", ""), ("classifier.", "an image classifier", ""),
               ("head.", "an image classifier", ""))


def describe_state_dict(state_dict: dict) -> str:
    """What a dict that is not a Mask R-CNN's state dict looks like, by its keys: a modest guess for
    the error that refuses it."""
    tensors = {str(key): value for key, value in state_dict.items() if isinstance(value, Tensor)}
    if not tensors:
        keys = shorten(", ".join(printable(str(key)) for key in list(state_dict)[:6]), 80)
        nested = any(isinstance(value, dict) for value in state_dict.values())
        return (f"a dict of {len(state_dict)} entries without tensors ({keys})"
                + ("; a training checkpoint? save the model's state_dict() alone" if nested else ""))
    absent = [key for key in _TORCHVISION_KEYS if key not in state_dict]
    what = f"{len(tensors)} tensors" + (f", without {absent[0]}{', ...' if len(absent) > 1 else ''}" if absent else "")
    for start, kind, advice in _LOOKS_LIKE:
        key = next((key for key in tensors if key.startswith(start)), None)
        if key is not None:
            return f"{what}; looks like {kind} ({shorten(key, 60)} {list(tensors[key].shape)}){advice}"
    return f"{what} (the first: {shorten(next(iter(tensors)), 60)})"

