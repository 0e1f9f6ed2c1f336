"""Where a training run starts from: the model's config and the weights of ``--init`` (ours or
torchvision's, with the class heads re-made for another number of classes). What it ends with,
model.pt, is written by ``maskray.pipeline.train.export``."""

from __future__ import annotations

from typing import Any

import torch

from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.model.checkpoint import checked_checkpoint, float32_state_dict, is_maskray_checkpoint, torchvision_config
from maskray.pipeline.errors import TrainingError
from maskray.pipeline.train.settings import TrainSettings
from maskray.pipeline.weights import Weights, load_state, torchvision_state_dict

# The heads whose shape depends on the number of classes: re-made when that number changes.
CLASS_HEADS = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.",
               "roi_heads.mask_predictor.mask_fcn_logits.")


def initial_state(init: Weights) -> tuple[MaskRCNNConfig, dict[str, torch.Tensor]]:
    """(the architecture of ``init``: ours as its checkpoint says, torchvision's as its keys show
    (v1 or v2, with masks or not); its float32 state dict)."""
    state = load_state(init)
    if is_maskray_checkpoint(state):
        state = checked_checkpoint(state, init.label)
        return MaskRCNNConfig.from_dict(state["config"]), float32_state_dict(state)
    state_dict = torchvision_state_dict(init, state)
    return torchvision_config(state_dict), state_dict


def model_config(settings: TrainSettings, class_names: tuple[str, ...], init_config: MaskRCNNConfig | None) -> MaskRCNNConfig:
    """The config of the model to train: the preset (or the architecture of ``--init``), the
    data set's classes, the norm, and the user's model options on top."""
    num_classes = len(class_names)
    if init_config is not None:
        base = init_config.replace(num_classes=num_classes, class_names=class_names)
    else:
        base = getattr(MaskRCNNConfig, settings.preset)(num_classes, class_names)
    norm = settings.norm
    if norm == "auto":
        # Weights trained elsewhere bring statistics to freeze (or to keep training, v2's BatchNorm);
        # a trunk from scratch has none.
        norm = base.backbone_norm if init_config is not None else "batch"
    options: dict[str, Any] = {"backbone_norm": norm}
    if norm == "batch" and base.backbone_norm != "batch":  # from scratch: every stage learns (v2's keep theirs)
        options["trainable_backbone_layers"] = 5
    options.update(settings.model_options)
    if "min_size" in options and isinstance(options["min_size"], int):
        options["min_size"] = (options["min_size"],)
    try:
        return base.replace(**options)
    except TypeError as error:
        raise TrainingError(f"unknown model option: {error}") from None


def load_initial_weights(model: MaskRCNN, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Loads ``state_dict`` into ``model``; the class-dependent heads are left as initialised when
    their shapes differ (another number of classes). Returns the names of those re-made."""
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    remade = sorted({k.rsplit(".", 1)[0] for k in mismatched if k.startswith(CLASS_HEADS)})
    misfits = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if not k.startswith(CLASS_HEADS)]
    is_remade = tuple(r + "." for r in remade)
    wanted = {k: v for k, v in state_dict.items() if not k.startswith(is_remade) and k not in mismatched}
    # num_batches_tracked: kept by a trained BatchNorm, unknown to a frozen one (and the reverse).
    wanted = {k: v for k, v in wanted.items() if not k.endswith("num_batches_tracked") or k in own}
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if not k.startswith(is_remade) and not k.endswith("num_batches_tracked")]
    if misfits or missing or unexpected:
        raise TrainingError(
            f"the initial weights do not fit this model: shapes {misfits[:3]}, missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (an init checkpoint must be of the same architecture)"
        )
    return remade
