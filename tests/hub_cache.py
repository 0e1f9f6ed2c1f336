"""A torch hub cache seeded with weights the tests make, under torchvision's exact file names.

Tests never download: ``maskray segment --weights coco-v2`` finds its file in ``$TORCH_HOME``
as it would after a first download, but the file holds the calibrated random weights of
tests/torchvision_reference.py (seeded, BatchNorm statistics calibrated) in the layout of the
real one: the same torchvision builder, the same keys and shapes, 91 COCO classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from maskray.pipeline.weights import WEIGHTS_NAMES
from tests.torchvision_reference import calibrated_state_dict, calibrated_state_dict_v2


def file_name(name: str) -> str:
    """The file torchvision downloads for a weights name (e.g. maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth)."""
    return os.path.basename(torchvision.models.get_weight(WEIGHTS_NAMES[name]).url)


def state_dict_for(name: str) -> dict[str, torch.Tensor]:
    """Weights in the layout of the published file of ``name``."""
    v2, boxes_only = name.endswith("-v2"), name.startswith("coco-boxes")
    if v2:
        return calibrated_state_dict_v2(seed=0, mask=not boxes_only)
    state_dict = calibrated_state_dict(seed=0)
    if boxes_only:  # fasterrcnn_resnet50_fpn: Mask R-CNN's keys without the mask head's
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor."))}
    return state_dict


def seed_torch_home(torch_home: Path, names=tuple(WEIGHTS_NAMES)) -> Path:
    """Writes the files of ``names`` into ``torch_home/hub/checkpoints``, as torch hub keeps them."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = folder / file_name(name)
        if not target.exists():
            torch.save(state_dict_for(name), target)
    return torch_home


@pytest.fixture(scope="session")
def seeded_torch_home(tmp_path_factory) -> Path:
    """A torch hub cache holding every name's file (made once per test session)."""
    return seed_torch_home(tmp_path_factory.mktemp("torch_home"))


@pytest.fixture
def torch_home(seeded_torch_home, monkeypatch) -> Path:
    """TORCH_HOME set to the seeded cache for this test and the commands it starts."""
    monkeypatch.setenv("TORCH_HOME", str(seeded_torch_home))
    return seeded_torch_home
