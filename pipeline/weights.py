"""Model weights, read once by the driver: ``--weights`` of segment and evaluate, ``--init`` of train.

Either flag takes a maskray checkpoint (``MaskRCNN.save``, what training exports) or a
torchvision Mask R-CNN state dict file, on any fsspec URL. The driver reads the bytes, hashes
them and loads them with ``weights_only=True`` (a file that would need pickled code is refused)
before any work starts, so a wrong file fails the job at once; segmentation's actors get the
same bytes through Ray's object store, so a weights file on the driver's disk serves actors on
every node. Every error is one line that names the flag and the file and says what the file is
instead (model.checkpoint's ``describe_unloadable`` and ``describe_state_dict``):
``--weights s3://b/cat.jpg: not a loadable weights file: a JPEG image``.
"""

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from maskray.pipeline.errors import StorageError
from maskray.pipeline.storage import MISSING, public_url, read_object


@dataclass(frozen=True)
class Weights:
    name: str  # the URL, without credentials
    sha256: str
    data: bytes
    flag: str = "--weights"  # the option that named the file, for the messages

    @property
    def label(self) -> str:
        return f"{self.flag} {self.name}"

    def open(self) -> io.BytesIO:
        """The bytes as a file named by ``label``, so that model.checkpoint's messages name the flag and the file."""
        buffer = io.BytesIO(self.data)
        buffer.name = self.label
        return buffer


def read_weights(url: str, storage_options: Mapping[str, Any] | None = None, flag: str = "--weights") -> Weights:
    """The weights file at ``url``; the MISSING kinds (no such file, a folder, a path through a
    file) or StorageError (retried first), each naming ``flag`` and the URL."""
    try:
        data = read_object(url, storage_options)
    except MISSING as error:  # of the kind it came as (a folder: also a FileNotFoundError), named by read_object
        raise type(error)(f"{flag} {error}") from None
    except StorageError as error:
        raise StorageError(f"{flag} {error}") from None
    return Weights(public_url(url), hashlib.sha256(data).hexdigest(), data, flag)


def load_state(weights: Weights) -> Any:
    """What the file holds (a maskray checkpoint, a state dict, ...), loaded with ``weights_only=True``;
    ValueError naming the flag and the file for one that torch does not load that way, pickled code included."""
    from maskray.model.checkpoint import safe_load

    return safe_load(weights.open())


def torchvision_state_dict(weights: Weights, state: Any) -> dict:
    """``state`` (loaded from ``weights``) checked to be a torchvision Mask R-CNN state dict; ValueError if not."""
    from maskray.model.checkpoint import read_torchvision_state_dict

    if not isinstance(state, dict):
        raise ValueError(f"{weights.label}: neither a maskray checkpoint nor a state dict (it holds a "  # noqa: TRY004
                         f"{type(state).__name__})")
    return read_torchvision_state_dict(state, weights.label)


def build_model(weights: Weights, overrides: Mapping[str, Any] | None = None, device: str = "cpu"):
    """The model in ``weights`` (eval mode, inference layout) with config fields ``overrides``
    changed (e.g. ``box_score_thresh``), on ``device``. Raises ValueError naming the flag and the
    file for anything that is neither a maskray checkpoint nor a torchvision state dict."""
    from maskray.model import MaskRCNN
    from maskray.model.checkpoint import describe_misfit, is_maskray_checkpoint, model_from_state

    state = load_state(weights)
    if is_maskray_checkpoint(state):
        model = model_from_state(state, weights.label)
    else:
        try:
            model = MaskRCNN.from_torchvision(torchvision_state_dict(weights, state))
        except RuntimeError as error:  # load_state_dict's dump of every key, said in one line
            misfit = describe_misfit(error)
            if misfit is None:
                raise
            raise ValueError(f"{weights.label}: a state dict that does not fit torchvision's "
                             f"maskrcnn_resnet50_fpn: {misfit}") from None
    if overrides:
        config = model.config.replace(**overrides)
        if config != model.config:
            rebuilt = MaskRCNN(config)
            rebuilt.load_state_dict(model.state_dict())
            model = rebuilt.eval().to_inference_layout()
    return model.to(device)
