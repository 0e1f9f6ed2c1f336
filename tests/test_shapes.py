"""The synthetic shapes set (pipeline/train/shapes.py, maskray make-shapes): deterministic, and its
masks are exactly where the shapes were painted.

Oracles: pycocotools reads the JSON and decodes the masks (COCO's own API); the painted pixels
themselves (a shape's colour is uniform up to the pixel noise, and differs from what lies
just outside its mask).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskray.pipeline.train.shapes import (
    CATEGORIES,
    NOISE_SIGMA,
    SHAPES_PER_IMAGE,
    make_image,
    parse_size,
    write_shapes,
)


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask grown by ``steps`` pixels (4-neighbourhood)."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(str(root), count=24, seed=3, size=(120, 96))
    return root


def test_the_json_is_coco_that_pycocotools_reads(shapes_set):
    coco = COCO(str(shapes_set / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert len(coco.getImgIds()) == 24
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        with Image.open(shapes_set / "images" / info["file_name"]) as image:
            assert image.size == (info["width"], info["height"]) == (120, 96)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(annotations) <= SHAPES_PER_IMAGE[1]
        for annotation in annotations:
            mask = coco.annToMask(annotation)
            ys, xs = np.nonzero(mask)
            # bbox and area describe the mask itself (pycocotools' convention: x, y, w, h in pixels).
            assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert annotation["area"] == mask.sum()
            assert annotation["iscrowd"] == 0
    # Over 24 images every kind of shape shows up, and images hold several.
    counts = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert {a["category_id"] for a in coco.dataset["annotations"]} == set(range(1, len(CATEGORIES) + 1))
    assert np.mean(counts) >= 2.5


def test_masks_are_exactly_the_painted_shapes(shapes_set):
    coco = COCO(str(shapes_set / "annotations.json"))
    overlapping_images = 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(shapes_set / "images" / info["file_name"]), dtype=np.float64)
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        if masks:
            # Visible masks never overlap: each pixel belongs to the shape painted last on it.
            assert (np.sum(masks, axis=0) <= 1).all()
        for i, mask in enumerate(masks):
            inside = pixels[mask]
            # One colour plus the pixel noise (clipping at 0/255 only narrows it).
            assert inside.std(axis=0).max() < 1.5 * NOISE_SIGMA
            # The ring of pixels just outside the mask is something else: background or another shape.
            ring = dilate(mask, 2) & ~mask
            if ring.sum() < 10:
                continue
            outside = pixels[ring]
            assert np.linalg.norm(outside.mean(axis=0) - inside.mean(axis=0)) > 20
            touching = [j for j, other in enumerate(masks) if j != i and (ring & other).any()]
            overlapping_images += bool(touching)
    assert overlapping_images > 0, "no shape touches another: the set has no occlusion"


def test_same_seed_same_data_and_prefix_stable(tmp_path):
    write_shapes(str(tmp_path / "a"), 3, seed=11, size=(64, 48))
    write_shapes(str(tmp_path / "b"), 5, seed=11, size=(64, 48))
    write_shapes(str(tmp_path / "c"), 3, seed=12, size=(64, 48))
    a, b, c = (json.loads((tmp_path / n / "annotations.json").read_text()) for n in "abc")
    for i in range(3):
        name = f"{i:06d}.png"
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert a["annotations"] == [x for x in b["annotations"] if x["image_id"] <= 3]
    assert (tmp_path / "a" / "images" / "000000.png").read_bytes() != (tmp_path / "c" / "images" / "000000.png").read_bytes()
    assert a["annotations"] != c["annotations"]
    assert make_image(11, 1, 64, 48) == make_image(11, 1, 64, 48)


def test_rle_decodes_to_the_image_size():
    _, annotations = make_image(0, 0, 80, 50)
    for annotation in annotations:
        rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
        assert mask_util.decode(rle).shape == (50, 80)


def test_make_shapes_job_writes_to_a_bucket(s3, capsys):
    from maskray.jobs import make_shapes

    parser = argparse.ArgumentParser()
    make_shapes.add_arguments(parser)
    args = parser.parse_args([s3.url("shapes"), "--count", "2", "--seed", "4", "--size", "64x48"])
    # The bucket's endpoint and credentials come from the environment of a real job; here the
    # module's writer is called with them directly, through the same code path.
    write_shapes(args.out, args.count, args.seed, parse_size(args.size), storage_options=s3.storage_options)
    fs = s3.filesystem()
    data = json.loads(fs.cat(f"{s3.name}/shapes/annotations.json"))
    assert [i["file_name"] for i in data["images"]] == ["000000.png", "000001.png"]
    assert fs.cat(f"{s3.name}/shapes/images/000001.png") == make_image(4, 1, 64, 48)[0]


def test_make_shapes_job_locally(tmp_path, capsys):
    from maskray.jobs import make_shapes

    parser = argparse.ArgumentParser()
    make_shapes.add_arguments(parser)
    assert make_shapes.run(parser.parse_args([str(tmp_path), "--count", "2", "--size", "64x64"])) == 0
    assert "2 images" in capsys.readouterr().out
    assert make_shapes.run(parser.parse_args([str(tmp_path), "--count", "2", "--size", "64"])) == 2
    captured = capsys.readouterr()  # through the one catch of every command: one line on stderr
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("maskray make-shapes: error: ") and "WIDTHxHEIGHT" in captured.err


@pytest.mark.parametrize("text", ["160", "0x10", "axb", "10x10x10"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
