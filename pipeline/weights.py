"""Model weights, read once by the driver: ``--weights`` of segment and evaluate, ``--init`` of train.

Either flag takes a name of published weights (``WEIGHTS_NAMES``: torchvision's COCO models), a
maskray checkpoint (``MaskRCNN.save``, what training exports) or a torchvision Mask R-CNN or
Faster R-CNN state dict file, on any fsspec URL. A name resolves through torchvision's weights
registry to its file in torch hub's cache (``$TORCH_HOME/hub/checkpoints``), downloaded there
once, hash-checked by torch's downloader, with a progress bar; without a network, a name whose
file is not cached fails at once with one line that names the file and the folder. The driver reads the bytes, hashes
them and loads them with ``weights_only=True`` (a file that would need pickled code is refused)
before any work starts, so a wrong file fails the job at once; segmentation's actors get the
same bytes through Ray's object store, so a weights file on the driver's disk serves actors on
every node. Every error is one line that names the flag and the file and says what the file is
instead (model.checkpoint's ``describe_unloadable`` and ``describe_state_dict``):
``--weights s3://b/cat.jpg: not a loadable weights file: a JPEG image``.
"""

import contextlib
import hashlib
import io
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskray.pipeline.errors import StorageError
from maskray.pipeline.storage import MISSING, absolute_url, public_url, read_object

# Published weights by name: torchvision's registry entries (torchvision.models.get_weight), with
# their COCO val2017 AP as torchvision reports it. The Faster R-CNNs write empty mask columns.
WEIGHTS_NAMES = {
    "coco": "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",  # box 37.9, mask 34.6
    "coco-v2": "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1",  # box 47.4, mask 41.8: the best Mask R-CNN it publishes
    "coco-boxes": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",  # box 37.0
    "coco-boxes-v2": "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1",  # box 46.7
}
DEFAULT_WEIGHTS = "coco-v2"  # what maskray segment runs without --weights
NAMES_HELP = ", ".join(WEIGHTS_NAMES)
# How long the download of a named file may wait for the network before it is said to be unreachable.
DOWNLOAD_TIMEOUT_S = 30
# torch's naming of hub files: the first hex digits of the file's SHA-256 after the last dash.
_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")


def weights_location(value: str) -> str:
    """A ``--weights``/``--init`` value as the driver keeps it: a name as it is, a path made absolute
    where the user typed it (a file called like a name is given as ``./coco``)."""
    return value if value in WEIGHTS_NAMES else absolute_url(value)


@dataclass(frozen=True)
class Weights:
    name: str  # a name of WEIGHTS_NAMES or the URL, without credentials
    sha256: str
    data: bytes
    flag: str = "--weights"  # the option that named the file, for the messages
    file: str = ""  # where the bytes came from: the URL, or a name's file in torch hub's cache

    @property
    def label(self) -> str:
        return f"{self.flag} {self.name}"

    def describe(self) -> dict[str, str]:
        """For the manifest and logs: the name, the file and its SHA-256."""
        return {"name": self.name, "file": self.file or self.name, "sha256": self.sha256}

    def open(self) -> io.BytesIO:
        """The bytes as a file named by ``label``, so that model.checkpoint's messages name the flag and the file."""
        buffer = io.BytesIO(self.data)
        buffer.name = self.label
        return buffer


def read_weights(url: str, storage_options: Mapping[str, Any] | None = None, flag: str = "--weights") -> Weights:
    """The weights file at ``url`` (or of a name of ``WEIGHTS_NAMES``); the MISSING kinds (no such
    file, a folder, a path through a file, a name's file neither cached nor downloadable) or
    StorageError (retried first), each naming ``flag`` and the URL."""
    if url in WEIGHTS_NAMES:
        path = named_weights_file(url, flag)
        data = path.read_bytes()
        return Weights(url, hashlib.sha256(data).hexdigest(), data, flag, str(path))
    try:
        data = read_object(url, storage_options)
    except MISSING as error:  # of the kind it came as (a folder: also a FileNotFoundError), named by read_object
        raise type(error)(f"{flag} {error}") from None
    except StorageError as error:
        raise StorageError(f"{flag} {error}") from None
    return Weights(public_url(url), hashlib.sha256(data).hexdigest(), data, flag, public_url(url))


def named_weights_file(name: str, flag: str = "--weights") -> Path:
    """The file of published weights ``name`` in torch hub's cache, downloaded there (hash-checked,
    with a progress bar) if it is not yet; FileNotFoundError in one line if it can be neither found
    nor fetched, naming the file, the folder to put it in, and the way around it."""
    import torch
    import torchvision

    url = torchvision.models.get_weight(WEIGHTS_NAMES[name]).url
    folder = Path(torch.hub.get_dir()) / "checkpoints"  # $TORCH_HOME/hub/checkpoints, as torchvision keeps it
    path = folder / os.path.basename(url)
    if path.is_file():
        return path
    hash_prefix = _HASH_PREFIX.search(path.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _network_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(path), hash_prefix and hash_prefix.group(1), progress=True)
    except (OSError, RuntimeError) as error:  # no network (URLError), a full disk, a damaged download (hash)
        reason = " ".join(str(getattr(error, "reason", None) or error).split()) or type(error).__name__
        raise FileNotFoundError(
            f"{flag} {name}: torchvision's {path.name} is not in torch hub's cache {folder} and could not be "
            f"downloaded ({reason}); put the file there (from {url}), or give {flag} PATH to a weights file") from None
    return path


@contextlib.contextmanager
def _network_timeout(seconds: float):
    # torch.hub's download sets no timeout of its own: a network that drops packets would hang the job.
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


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
