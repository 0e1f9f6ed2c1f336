"""Results as pictures: an image with its instances' masks, boxes, labels and scores drawn.

``render_overlay`` reads the image through the same decode path as the job (so EXIF rotation
matches the masks), decodes each mask's RLE with pycocotools, and draws with torchvision's
``draw_segmentation_masks`` and ``draw_bounding_boxes``.
"""

from collections.abc import Mapping
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from maskray.pipeline.decode import decode_image
from maskray.pipeline.results.query import open_table
from maskray.pipeline.segment.output import IMAGES, INSTANCES
from maskray.pipeline.storage import MISSING, open_object_url, public_url, read_bytes

# Distinct, readable colours; a label keeps its colour across images.
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000"]


def find_image_uri(output_url: str, image: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The ``images`` row of ``image``: its exact URI, or a path or name that ends exactly one URI."""
    images = open_table(output_url, IMAGES, storage_options)
    rows = images.to_table(filter=ds.field("image_uri") == image).to_pylist()
    if not rows:
        suffix = image if image.startswith("/") else "/" + image
        rows = images.to_table(filter=pc.ends_with(ds.field("image_uri"), suffix)).to_pylist()
    if not rows:
        raise LookupError(f"no image {image!r} in the output {output_url}")
    if len(rows) > 1:
        names = ", ".join(r["image_uri"] for r in rows[:5])
        raise LookupError(f"{image!r} matches {len(rows)} images ({names}, ...): give the full image_uri")
    return rows[0]


def render_overlay(
    output_url: str,
    image: str,
    storage_options: Mapping[str, Any] | None = None,
    min_score: float = 0.0,
    alpha: float = 0.45,
    scale: int = 1,
):
    """The image ``image`` (a URI in the output, or a unique suffix of one) with its instances
    of score >= ``min_score`` drawn, as a PIL image; and the number of instances drawn.
    ``scale`` enlarges the picture (nearest pixel) before drawing, so that labels on small
    images stay legible."""
    from PIL import Image
    from pycocotools import mask as mask_utils
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    row = find_image_uri(output_url, image, storage_options)
    if row["status"] != "ok":
        raise ValueError(f"{row['image_uri']} could not be segmented: {row['error']}")
    uri = row["image_uri"]
    fs, path = open_object_url(uri, storage_options if not uri.startswith("file://") else None)
    try:
        data = read_bytes(fs, path, public_url(uri))  # retried, like the job's own read of it
    except MISSING:
        raise FileNotFoundError(f"{public_url(uri)}: no such file (moved or deleted since it was segmented)") from None
    picture = _enlarge(decode_image(data), scale).contiguous()
    instances = open_table(output_url, INSTANCES, storage_options).to_table(
        filter=(ds.field("image_uri") == uri) & (ds.field("score") >= min_score)
    ).sort_by("instance").to_pylist()
    if instances:
        colours = [PALETTE[r["label"] % len(PALETTE)] for r in instances]
        rles = [{"size": [r["mask_height"], r["mask_width"]], "counts": r["mask_counts"].encode()} for r in instances]
        if all(r["mask_counts"] for r in instances):  # a Faster R-CNN output has boxes only
            masks = _enlarge(torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).bool(), scale)
            picture = draw_segmentation_masks(picture, masks, alpha=alpha, colors=colours)
        boxes = torch.tensor([[r["box_x1"], r["box_y1"], r["box_x2"], r["box_y2"]] for r in instances]) * scale
        labels = [f"{r['label_name']} {r['score']:.2f}" for r in instances]
        picture = draw_bounding_boxes(picture, boxes, labels=labels, colors=colours, width=2)
    return Image.fromarray(picture.permute(1, 2, 0).numpy()), len(instances)


def auto_scale(height: int, width: int, target: int = 512) -> int:
    """The whole-number enlargement that brings the shorter side to about ``target`` pixels."""
    return max(1, round(target / max(1, min(height, width))))


def _enlarge(tensor: torch.Tensor, scale: int) -> torch.Tensor:
    if scale == 1:
        return tensor
    return tensor.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
