"""COCO training data (pipeline/train/coco.py): targets as pycocotools sees them, from local folders
and buckets, and bad data refused or counted, never silently wrong.

Oracle: pycocotools' COCO API on the same JSON (annToMask, the bbox it holds).
"""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from maskray.pipeline.train.coco import CocoDataError, CocoDataset, RandomHorizontalFlip, collate, horizontal_flip
from maskray.pipeline.train.shapes import write_shapes

WIDTH, HEIGHT = 40, 30


def write_png(path, width=WIDTH, height=HEIGHT, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_set(root, annotations, categories=None, images=None):
    """A small COCO set: two images, the given annotations and categories."""
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT},
        {"id": 2, "file_name": "sub/b.png", "width": WIDTH, "height": HEIGHT},
    ]
    for i, image in enumerate(images):
        write_png(root / "images" / image["file_name"], image["width"], image["height"], seed=i)
    data = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (root / "ann.json").write_text(json.dumps(data))
    return str(root / "ann.json"), str(root / "images")


POLYGON = [[5.0, 5.0, 30.0, 6.0, 20.0, 25.0]]
SQUARE_RLE = mask_util.encode(np.asfortranarray(np.pad(np.ones((10, 12), np.uint8), ((4, HEIGHT - 14), (20, WIDTH - 32)))))


def annotations_of_every_kind():
    uncompressed = {"size": [HEIGHT, WIDTH], "counts": [HEIGHT * 2 + 3, 5, HEIGHT * WIDTH - HEIGHT * 2 - 8]}
    return [
        {"id": 10, "image_id": 1, "category_id": 7, "segmentation": POLYGON, "bbox": [5, 5, 25, 20], "area": 1, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 4, 12, 10], "area": 120, "iscrowd": 0,
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": SQUARE_RLE["counts"].decode()}},
        {"id": 12, "image_id": 1, "category_id": 3, "segmentation": uncompressed, "bbox": [2, 3, 1, 5], "area": 5, "iscrowd": 0},
        {"id": 13, "image_id": 1, "category_id": 7, "segmentation": uncompressed, "bbox": [0, 0, 40, 30], "area": 9, "iscrowd": 1},
    ]


def test_targets_match_pycocotools(tmp_path):
    json_path, images = write_set(tmp_path, annotations_of_every_kind())
    dataset = CocoDataset(json_path, images)
    coco = COCO(json_path)
    assert dataset.class_names == ("__background__", "cat", "dog")  # category ids 3, 7 -> labels 1, 2
    assert len(dataset) == 2

    image, target = dataset[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, HEIGHT, WIDTH)
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(tmp_path / "images" / "a.png"))))
    kept = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=1)) if not a["iscrowd"]]  # crowds left out
    assert target["labels"].tolist() == [dataset.label_of_category[a["category_id"]] for a in kept] == [2, 1, 1]
    for i, annotation in enumerate(kept):
        assert np.array_equal(target["masks"][i].numpy(), coco.annToMask(annotation))
        x, y, w, h = annotation["bbox"]
        assert target["boxes"][i].tolist() == [x, y, x + w, y + h]
    assert target["image_id"].item() == 1
    assert target["skipped"].item() == 0
    assert dataset.skipped["crowd"] == 1


def test_an_image_without_annotations_gives_an_empty_target_the_model_trains_on(tmp_path):
    json_path, images = write_set(tmp_path, annotations_of_every_kind())
    image, target = CocoDataset(json_path, images)[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, HEIGHT, WIDTH)

    from maskray.model import MaskRCNN, MaskRCNNConfig

    torch.manual_seed(0)
    config = MaskRCNNConfig.light(3, min_size=(64,), max_size=64, backbone_norm="batch", trainable_backbone_layers=5)
    model = MaskRCNN(config).train()
    first_image, first_target = CocoDataset(json_path, images)[0]
    targets = [{k: v for k, v in t.items() if k != "skipped"} for t in (first_target, target)]
    losses = model([first_image, image], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_reads_from_a_bucket_like_from_a_folder(tmp_path, s3):
    write_shapes(str(tmp_path), 3, seed=1, size=(48, 40))
    write_shapes(s3.url("set"), 3, seed=1, size=(48, 40), storage_options=s3.storage_options)
    local = CocoDataset(str(tmp_path / "annotations.json"), str(tmp_path / "images"))
    remote = CocoDataset(s3.url("set", "annotations.json"), s3.url("set", "images"), s3.storage_options)
    for i in range(3):
        (a_image, a_target), (b_image, b_target) = local[i], remote[i]
        assert torch.equal(a_image, b_image)
        assert all(torch.equal(a_target[k], b_target[k]) for k in a_target)


def test_flip_moves_boxes_with_masks(tmp_path):
    write_shapes(str(tmp_path), 2, seed=2, size=(56, 40))
    image, target = CocoDataset(str(tmp_path / "annotations.json"), str(tmp_path / "images"))[0]
    flipped_image, flipped = horizontal_flip(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    for box, mask in zip(flipped["boxes"], flipped["masks"]):
        # The box of the flipped mask, as pycocotools computes it, is the flipped box.
        x, y, w, h = mask_util.toBbox(mask_util.encode(np.asfortranarray(mask.numpy())))
        assert box.tolist() == [x, y, x + w, y + h]
    torch.manual_seed(0)
    always = RandomHorizontalFlip(CocoDataset(str(tmp_path / "annotations.json"), str(tmp_path / "images")), p=1.0)
    assert torch.equal(always[0][0], flipped_image)
    images, targets = collate([always[0], always[1]])
    assert len(images) == len(targets) == 2


# -----------------------------------------------------------------------------------------------
# Bad data


def test_missing_image_file_is_an_error_that_names_it(tmp_path):
    json_path, images = write_set(tmp_path, [])
    (tmp_path / "images" / "sub" / "b.png").unlink()
    with pytest.raises(CocoDataError, match=r"1 of 2 image files .* missing.*sub/b\.png"):
        CocoDataset(json_path, images)


def test_unknown_category_is_an_error_that_names_the_annotation(tmp_path):
    bad = {"id": 99, "image_id": 1, "category_id": 5, "segmentation": POLYGON, "bbox": [5, 5, 25, 20], "iscrowd": 0}
    json_path, images = write_set(tmp_path, [bad])
    with pytest.raises(CocoDataError, match=r"annotation 99 has category_id 5.*ids \[3, 7\]"):
        CocoDataset(json_path, images)


def test_annotation_of_an_unknown_image_is_an_error(tmp_path):
    bad = {"id": 5, "image_id": 42, "category_id": 3, "segmentation": POLYGON, "bbox": [5, 5, 25, 20], "iscrowd": 0}
    json_path, images = write_set(tmp_path, [bad])
    with pytest.raises(CocoDataError, match="annotation 5 refers to image 42"):
        CocoDataset(json_path, images)


@pytest.mark.parametrize("segmentation", [[[1.0, 1.0, 5.0, 5.0]], [[3.0, 3.0, 3.0, 3.0, 3.0, 3.0]], []],
                         ids=["two_points", "zero_area", "no_polygon"])
def test_degenerate_polygon_is_skipped_and_counted(tmp_path, segmentation):
    good = annotations_of_every_kind()[0]
    bad = {"id": 20, "image_id": 1, "category_id": 3, "segmentation": segmentation, "bbox": [1, 1, 4, 4], "iscrowd": 0}
    json_path, images = write_set(tmp_path, [good, bad])
    dataset = CocoDataset(json_path, images)
    _, target = dataset[0]
    assert target["labels"].tolist() == [2]  # only the good one
    assert target["skipped"].item() == 1
    assert dataset.target(0)[1] == {"degenerate polygon": 1}


def test_box_with_no_area_is_skipped_and_counted(tmp_path):
    bad = dict(annotations_of_every_kind()[0], id=21, bbox=[WIDTH + 5, 2, 3, 3])  # wholly outside the image
    json_path, images = write_set(tmp_path, [bad])
    dataset = CocoDataset(json_path, images)
    assert dataset[0][1]["boxes"].shape == (0, 4)
    assert dataset.target(0)[1] == {"empty box": 1} and dataset[0][1]["skipped"].item() == 1


@pytest.mark.parametrize("content, match", [
    (b"", "the file is empty"),
    (b"   \n", "the file is empty"),
    (b"{}", "no 'images'"),
    (b"[]", "expected a JSON object"),
    (b'{"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "annotations": []}', "no 'categories'"),
    (b"{not json", "not JSON"),
], ids=["empty", "blank", "empty_object", "list", "no_categories", "garbage"])
def test_empty_or_malformed_json_is_a_clear_error(tmp_path, content, match):
    (tmp_path / "ann.json").write_bytes(content)
    with pytest.raises(CocoDataError, match=match):
        CocoDataset(str(tmp_path / "ann.json"), str(tmp_path))


def test_missing_json_is_a_clear_error(tmp_path):
    with pytest.raises(CocoDataError, match="no such file"):
        CocoDataset(str(tmp_path / "nothing.json"), str(tmp_path))


def test_image_of_another_size_than_the_json_says_is_an_error(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT}]
    json_path, folder = write_set(tmp_path, [], images=images)
    write_png(tmp_path / "images" / "a.png", WIDTH + 1, HEIGHT)
    with pytest.raises(CocoDataError, match=f"the image is {WIDTH + 1}x{HEIGHT} but .* says {WIDTH}x{HEIGHT}"):
        CocoDataset(json_path, folder)[0]


def test_rle_of_the_wrong_size_is_an_error(tmp_path):
    bad = dict(annotations_of_every_kind()[1], segmentation={"size": [5, 5], "counts": "PP5"})
    json_path, images = write_set(tmp_path, [bad])
    with pytest.raises(CocoDataError, match="annotation 11: RLE of size"):
        CocoDataset(json_path, images)[0]


def test_an_undecodable_image_names_the_problem(tmp_path):
    json_path, images = write_set(tmp_path, [])
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    from maskray.pipeline.decode import ImageDecodeError

    with pytest.raises(ImageDecodeError):
        CocoDataset(json_path, images)[0]
