"""Published weights by name (``--weights coco-v2``, ``--init coco``): found in torch hub's cache
under torchvision's file names, recorded in the manifest, and one line when they are not there.

The cache is a temporary TORCH_HOME seeded with weights the tests make (tests/hub_cache.py):
nothing is downloaded. The Ray cluster of these tests was started without that TORCH_HOME, so a
job that runs proves that its actors got the weights from the driver, not from a cache of their own.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from maskray.model.checkpoint import torchvision_layout
from maskray.pipeline.segment.job import run_segment
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.train.shapes import make_image, write_shapes
from maskray.pipeline.weights import DEFAULT_WEIGHTS, WEIGHTS_NAMES, build_model, read_weights
from tests.hub_cache import file_name, state_dict_for

MASKRAY = Path(sys.executable).parent / "maskray"

# name -> (the torchvision builder whose layout its file has, whether it has a mask head)
LAYOUTS = {"coco": ("maskrcnn_resnet50_fpn", True), "coco-v2": ("maskrcnn_resnet50_fpn_v2", True),
           "coco-boxes": ("fasterrcnn_resnet50_fpn", False), "coco-boxes-v2": ("fasterrcnn_resnet50_fpn_v2", False)}


def test_the_names_are_torchvisions_registry_entries():
    for name, entry in WEIGHTS_NAMES.items():
        weights = torchvision.models.get_weight(entry)
        builder, _ = LAYOUTS[name]
        assert file_name(name).startswith(f"{builder}_coco-") and weights.meta["categories"][1] == "person"
    assert DEFAULT_WEIGHTS == "coco-v2"


@pytest.mark.parametrize("name", list(WEIGHTS_NAMES))
def test_a_name_loads_its_file_from_the_cache(name, torch_home):
    weights = read_weights(name)
    cached = torch_home / "hub" / "checkpoints" / file_name(name)
    assert weights.describe() == {"name": name, "file": str(cached),
                                  "sha256": hashlib.sha256(cached.read_bytes()).hexdigest()}
    model = build_model(weights)
    _, has_mask = LAYOUTS[name]
    expected = state_dict_for(name)
    assert model.config.mask is has_mask and model.class_names[1] == "person" and model.config.num_classes == 91
    assert torchvision_layout(expected) == {k: getattr(model.config, k) for k in torchvision_layout(expected)}
    # The weights are the file's (folding BatchNorm changes none of the stored tensors' names or values here).
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(model.state_dict()[key], expected[key])


def run_maskray(*argv: str, cwd: Path, torch_home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(MASKRAY), *argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "TORCH_HOME": str(torch_home), "HOME": str(cwd)}, check=False)


@pytest.mark.parametrize("argv, flag", [
    (["segment", "shapes/images", "out"], "--weights"),  # the default model, coco-v2
    (["evaluate", "--weights", "coco", "--json", "shapes/annotations.json", "--images", "shapes/images"], "--weights"),
    (["train", "--train-json", "shapes/annotations.json", "--train-images", "shapes/images", "--output", "run",
      "--init", "coco-boxes"], "--init"),
])
def test_a_name_without_its_file_fails_in_one_line_before_any_work(argv, flag, tmp_path):
    """No network here: the download fails, and the line says which file goes where, and the way around it."""
    write_shapes(str(tmp_path / "shapes"), 2, seed=0, size=(64, 48))
    empty_cache = tmp_path / "torch-home"
    result = run_maskray(*argv, cwd=tmp_path, torch_home=empty_cache)
    name = argv[argv.index(flag) + 1] if flag in argv else DEFAULT_WEIGHTS
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    line = lines[-1]
    assert line.startswith(f"maskray {argv[0]}: error: {flag} {name}: torchvision's {file_name(name)} is not in")
    assert str(empty_cache / "hub" / "checkpoints") in line and f"or give {flag} PATH" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_file_called_like_a_name_is_taken_by_its_path(tmp_path, monkeypatch):
    from maskray.pipeline.weights import weights_location

    monkeypatch.chdir(tmp_path)
    assert weights_location("coco") == "coco"
    assert weights_location("./coco") == str(tmp_path / "coco")
    assert SegmentJob("in", "out", "./coco").weights == str(tmp_path / "coco")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for index in range(3):
        (folder / f"p{index}.png").write_bytes(make_image(7, index, 96, 72)[0])
    return folder


def test_a_box_only_model_by_name_writes_empty_mask_columns(ray_local, torch_home, photos, tmp_path):
    from maskray.pipeline.results.query import connect

    out = tmp_path / "out"
    job = SegmentJob(str(photos), str(out), "coco-boxes-v2", shard_size=2, progress=False, score_threshold=0.0)
    summary = run_segment(job)
    assert summary.complete and summary.images == 3 and summary.instances > 0

    manifest = json.loads((out / "_manifest.json").read_text())
    cached = torch_home / "hub" / "checkpoints" / file_name("coco-boxes-v2")
    assert manifest["weights"] == {"name": "coco-boxes-v2", "file": str(cached),
                                   "sha256": hashlib.sha256(cached.read_bytes()).hexdigest()}
    assert manifest["config"]["mask"] is False and manifest["config"]["box_head_convs"] == 4
    con = connect(str(out))
    rows = con.sql("SELECT i.mask_counts, i.mask_height, i.mask_width, i.area, i.box_x1, i.box_y1, i.box_x2, i.box_y2, "
                   "m.width, m.height FROM instances i JOIN images m USING (image_uri)").fetchall()
    for counts, mask_height, mask_width, area, x1, y1, x2, y2, width, height in rows:
        assert counts == "" and (mask_height, mask_width) == (height, width)  # the documented empty mask
        assert abs(area - (x2 - x1) * (y2 - y1)) <= 1  # a box-only instance's area is its box's
