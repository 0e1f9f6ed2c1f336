"""Model weights for a job: read once by the driver, checked, hashed, and shipped to the actors.

``--weights`` takes a maskray checkpoint (``MaskRCNN.save``, what training exports) or a
torchvision Mask R-CNN state dict file, on any fsspec URL. The driver reads the bytes and
builds the model once before any work starts, so a wrong file fails the job at once; the
actors get the same bytes through Ray's object store, so a weights file on the driver's disk
serves actors on every node.
"""

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from maskray.pipeline.storage import StorageError, describe_storage_error, open_url, public_url


@dataclass(frozen=True)
class Weights:
    name: str  # the URL, without credentials
    sha256: str
    data: bytes


def read_weights(url: str, storage_options: Mapping[str, Any] | None = None) -> Weights:
    fs, path = open_url(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--weights {public_url(url)}: no such file") from None
    except Exception as error:  # noqa: BLE001 - refused credentials, no endpoint, no bucket: botocore's many kinds
        raise StorageError("--weights " + describe_storage_error(url, error)) from None
    return Weights(public_url(url), hashlib.sha256(data).hexdigest(), data)


def build_model(weights: Weights, overrides: Mapping[str, Any] | None = None, device: str = "cpu"):
    """The model in ``weights`` (eval mode, inference layout) with config fields ``overrides``
    changed (e.g. ``box_score_thresh``), on ``device``. Raises ValueError naming the file for
    anything that is neither a maskray checkpoint nor a torchvision state dict."""
    from maskray.model import MaskRCNN
    from maskray.model.checkpoint import FORMAT, safe_load

    try:
        state = safe_load(io.BytesIO(weights.data))
    except ValueError as error:
        raise ValueError(f"--weights {weights.name}: {str(error).split(': ', 1)[-1]}") from None
    try:
        if isinstance(state, dict) and state.get("format") == FORMAT:
            model = MaskRCNN.load(io.BytesIO(weights.data))
        else:
            model = MaskRCNN.from_torchvision(state)
    except ValueError as error:
        raise ValueError(f"--weights {weights.name}: {str(error).split(': ', 1)[-1]}") from None
    if overrides:
        config = model.config.replace(**overrides)
        if config != model.config:
            rebuilt = MaskRCNN(config)
            rebuilt.load_state_dict(model.state_dict())
            model = rebuilt.eval().to_inference_layout()
    return model.to(device)
