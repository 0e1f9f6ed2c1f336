"""COCO instance data from any fsspec URL, as Mask R-CNN training targets.

``CocoDataset(json_url, images_url)`` reads a COCO instances JSON and serves, per image, the
uint8 Tensor[3, H, W] and its target (``boxes`` xyxy float, ``labels`` int64 1..K, ``masks``
uint8 [N, H, W], ``image_id``). The JSON and the images are read through ``maskray.pipeline.storage``
(retried through throttling, server errors and dropped connections) and images decoded by
``maskray.pipeline.decode.decode_image``: the very path the segmentation job takes.

What is done with the data, as torchvision's detection references do:

- Crowd annotations (``iscrowd=1``) are left out of the targets.
- Polygons, uncompressed RLE and compressed RLE become masks through pycocotools.
- Boxes come from the annotation's ``bbox`` (x, y, w, h), clipped to the image; an annotation
  whose box has no area after clipping is skipped.
- Category ids (any integers) map to contiguous labels 1..K in id order; label 0 is background.
- Images without annotations stay (empty targets: the model learns background from them).

Bad data never passes silently. Fatal, at construction, with a message that names the
culprit: an unreadable or empty JSON, no images or no categories, an annotation of an unknown
category or an unknown image, a missing image file. Skipped and counted (``skipped``, reported
by the training job): degenerate polygons (fewer than three points, or of zero area) and boxes
with no area.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import Tensor

from maskray.pipeline.decode import decode_image
from maskray.pipeline.errors import MaskrayError
from maskray.pipeline.storage import MISSING, join, list_files, open_url, path_type, public_url, read_bytes, read_object


class CocoDataError(MaskrayError, ValueError):
    """The COCO JSON or its images cannot be used as they are; the message says where and why."""


@dataclass
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int
    annotations: list[dict] = field(default_factory=list)


def read_coco_json(url: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The JSON at ``url``, checked to be a COCO instances file with images and categories."""
    where = public_url(url)
    try:
        raw = read_object(url, storage_options)
    except MISSING as error:  # read_object's message names the URL: "no such file", "is a folder, not a file"
        raise CocoDataError(str(error)) from None
    if not raw.strip():
        raise CocoDataError(f"{where}: the file is empty (expected a COCO instances JSON)")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CocoDataError(f"{where}: not JSON ({error})") from None
    if not isinstance(data, dict):
        raise CocoDataError(f"{where}: expected a JSON object with images, annotations and categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise CocoDataError(f"{where}: no {key!r} (a COCO instances JSON lists its {key})")
    if not isinstance(data.get("annotations", []), list):
        raise CocoDataError(f"{where}: 'annotations' must be a list")
    return data


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray | None:
    """The uint8 [H, W] mask of a COCO segmentation (polygons, RLE or compressed RLE), or None
    for a degenerate polygon (fewer than three points, or no pixels)."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", [])) != [height, width]:
            raise CocoDataError(f"RLE of size {segmentation.get('size')} on an image of {height}x{width}")
        counts = segmentation["counts"]
        rle = mask_util.frPyObjects(segmentation, height, width) if isinstance(counts, list) else dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise CocoDataError(f"segmentation is neither polygons nor RLE: {str(segmentation)[:80]}")
    mask = mask_util.decode(rle)
    return mask if mask.any() else None


class CocoDataset(torch.utils.data.Dataset):
    """COCO instances (JSON + images at fsspec URLs) as (image, target) pairs."""

    def __init__(self, json_url: str, images_url: str, storage_options: Mapping[str, Any] | None = None,
                 check_files: bool = True):
        self.json_url = public_url(json_url)
        self.images_url = images_url
        self.storage_options = dict(storage_options or {})
        data = read_coco_json(json_url, self.storage_options)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        if len(set(self.category_ids)) != len(self.category_ids):
            raise CocoDataError(f"{self.json_url}: duplicate category ids {sorted(self.category_ids)}")
        self.label_of_category = {cid: label for label, cid in enumerate(self.category_ids, start=1)}
        self.class_names = ("__background__", *(str(c["name"]) for c in categories))

        self.images: list[CocoImage] = []
        by_id: dict[int, CocoImage] = {}
        for entry in data["images"]:
            try:
                image = CocoImage(int(entry["id"]), str(entry["file_name"]), int(entry["width"]), int(entry["height"]))
            except (KeyError, TypeError, ValueError):
                raise CocoDataError(f"{self.json_url}: image entry without id, file_name, width and height: {entry}") from None
            if image.id in by_id:
                raise CocoDataError(f"{self.json_url}: image id {image.id} appears twice")
            by_id[image.id] = image
            self.images.append(image)

        self.skipped: Counter[str] = Counter()
        for annotation in data.get("annotations", []):
            ann_id = annotation.get("id", "?")
            image = by_id.get(annotation.get("image_id"))
            if image is None:
                raise CocoDataError(f"{self.json_url}: annotation {ann_id} refers to image {annotation.get('image_id')}, which is not in 'images'")
            if annotation.get("category_id") not in self.label_of_category:
                raise CocoDataError(
                    f"{self.json_url}: annotation {ann_id} has category_id {annotation.get('category_id')}, "
                    f"which is not in 'categories' (ids {self.category_ids})"
                )
            if annotation.get("iscrowd", 0):
                self.skipped["crowd"] += 1  # torchvision's references leave crowds out of training too
                continue
            image.annotations.append(annotation)

        if check_files:
            self._check_files()

    def _check_files(self) -> None:
        """Every image file exists: one listing of the images prefix, not a request per file."""
        fs, root = open_url(self.images_url, self.storage_options)
        if path_type(fs, root) is None:  # a typo in the folder's name: say that, not "N files missing"
            raise CocoDataError(f"{public_url(self.images_url)}: no such folder or prefix (the images of "
                                f"{self.json_url})")
        present = {p[len(root):].lstrip("/") for p in list_files(fs, root, recursive=True)}
        missing = [image.file_name for image in self.images if image.file_name not in present]
        if missing:
            raise CocoDataError(
                f"{public_url(self.images_url)}: {len(missing)} of {len(self.images)} image files named in "
                f"{self.json_url} are missing, e.g. {missing[:3]}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, index: int) -> Tensor:
        image = self.images[index]
        fs, root = open_url(self.images_url, self.storage_options)  # fsspec caches the filesystem
        where = f"{public_url(self.images_url.rstrip('/'))}/{image.file_name}"
        try:
            pixels = decode_image(read_bytes(fs, join(root, image.file_name), where))
        except MISSING:
            raise CocoDataError(f"{where}: no such image file (named in {self.json_url})") from None
        if tuple(pixels.shape[-2:]) != (image.height, image.width):
            raise CocoDataError(
                f"{where}: the image is {pixels.shape[-1]}x{pixels.shape[-2]} "
                f"but {self.json_url} says {image.width}x{image.height}"
            )
        return pixels

    def target(self, index: int) -> tuple[dict[str, Tensor], Counter[str]]:
        """The target of image ``index`` and what was skipped making it."""
        image = self.images[index]
        height, width = image.height, image.width
        boxes, labels, masks = [], [], []
        skipped: Counter[str] = Counter()
        for annotation in image.annotations:
            x, y, w, h = (float(v) for v in annotation["bbox"])
            box = [max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)]
            if box[2] <= box[0] or box[3] <= box[1]:
                skipped["empty box"] += 1
                continue
            try:
                mask = annotation_mask(annotation["segmentation"], height, width)
            except CocoDataError as error:
                raise CocoDataError(f"{self.json_url}: annotation {annotation.get('id', '?')}: {error}") from None
            if mask is None:
                skipped["degenerate polygon"] += 1
                continue
            boxes.append(box)
            labels.append(self.label_of_category[annotation["category_id"]])
            masks.append(mask)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
            "image_id": torch.tensor(image.id),
        }
        return target, skipped

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(image, target); the target's ``skipped`` counts the annotations left out of it."""
        target, skipped = self.target(index)
        target["skipped"] = torch.tensor(sum(skipped.values()))
        return self.read_image(index), target


# ----------------------------------------------------------------------------------------------
# Augmentation and batching


def horizontal_flip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The image mirrored left-right, with its boxes and masks."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


class RandomHorizontalFlip(torch.utils.data.Dataset):
    """A dataset view that flips each sample with probability ``p`` (torch's RNG, so seeded
    per DataLoader worker). Multi-scale resizing is the model's own (config ``min_size``)."""

    def __init__(self, dataset: torch.utils.data.Dataset, p: float = 0.5):
        self.dataset, self.p = dataset, p

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        if torch.rand(()) < self.p:
            image, target = horizontal_flip(image, target)
        return image, target


def collate(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images of different sizes stay a list, as the model takes them."""
    images, targets = zip(*batch)
    return list(images), list(targets)
