"""What a training run ends with: OUTPUT/model.pt, the trained model as a plain maskray
checkpoint (no optimizer), in the layout that ``maskray segment --weights`` and ``--init`` read."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.model.checkpoint import float32_state_dict
from maskray.pipeline.storage import open_url, write_bytes_atomically


def inference_config(config: MaskRCNNConfig) -> MaskRCNNConfig:
    """The exported model's config: a trained BatchNorm becomes a frozen one (the same affine
    map in eval mode), so the file is the standard model that inference and fine-tuning expect."""
    if config.backbone_norm == "frozen":
        return config
    return config.replace(backbone_norm="frozen", trainable_backbone_layers=MaskRCNNConfig.trainable_backbone_layers)


def export_model(checkpoint: Mapping[str, Any], url: str, dtype: str = "float32",
                 storage_options: Mapping[str, Any] | None = None) -> MaskRCNN:
    """Writes the model of a training checkpoint as a plain maskray checkpoint (no optimizer)."""
    config = inference_config(MaskRCNNConfig.from_dict(checkpoint["config"]))
    model = MaskRCNN(config)
    state_dict = {k: v for k, v in float32_state_dict(checkpoint).items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state_dict)
    buffer = io.BytesIO()
    model.save(buffer, weights_dtype=dtype, trained={"epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"),
                                                      "metrics": checkpoint.get("metrics", [])[-1:]})
    write_bytes_atomically(*open_url(url, storage_options), buffer.getvalue())  # never half a model.pt
    return model.eval()

