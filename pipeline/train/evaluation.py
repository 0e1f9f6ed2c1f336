"""COCO evaluation of a model: detections as COCO results, scored by pycocotools' COCOeval.

``detections_to_coco_results`` turns the model's output (xyxy boxes, labels 1..K, RLE masks)
into COCO results (xywh boxes, the dataset's category ids, RLE segmentations);
``coco_evaluate`` runs COCOeval for ``bbox`` and ``segm`` on them against the ground-truth
JSON; ``evaluate_model`` does both over a ``CocoDataset`` (or a shard of it, for the training
job's workers) and can write the results JSON that any COCO tool reads.

Nothing here re-implements COCOeval: the numbers are pycocotools' own, so they agree with
COCOeval run by hand on the same results file (tests/test_evaluate.py checks exactly that).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# COCOeval's summary, in the order of its ``stats`` array.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def detections_to_coco_results(image_id: int, detection: Mapping[str, Any], category_ids: Sequence[int]) -> list[dict]:
    """One image's detections as COCO results; ``category_ids[label - 1]`` is a label's category."""
    results = []
    boxes = detection["boxes"].tolist()
    labels = detection["labels"].tolist()
    scores = detection["scores"].tolist()
    masks = detection.get("masks")
    for i, ((x1, y1, x2, y2), label, score) in enumerate(zip(boxes, labels, scores)):
        result = {
            "image_id": int(image_id),
            "category_id": int(category_ids[label - 1]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score),
        }
        if masks is not None:
            result["segmentation"] = {"size": list(masks[i]["size"]), "counts": masks[i]["counts"]}
        results.append(result)
    return results


def coco_ground_truth(data: dict):
    """A pycocotools COCO object over an already loaded instances JSON (quietly)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    # COCOeval needs each annotation's area (its size ranges, and crowd matching) and box;
    # COCO files made by other tools often leave them out. Fill them in from the mask, as COCO's
    # own files define them (a box-only annotation's area is its box's).
    for annotation in coco.dataset.get("annotations", []):
        if "area" in annotation and "bbox" in annotation:
            continue
        if annotation.get("segmentation"):
            rle = coco.annToRLE(annotation)
            annotation.setdefault("area", float(mask_utils.area(rle)))
            annotation.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
        elif "bbox" in annotation:
            annotation.setdefault("area", float(annotation["bbox"][2] * annotation["bbox"][3]))
    return coco


def coco_evaluate(ground_truth: dict, results: list[dict], iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Sequence[int] | None = None, verbose: bool = False) -> dict[str, float]:
    """COCOeval's 12 summary numbers per IoU type, as ``{"segm_AP": ..., "bbox_AP50": ...}``.

    ``image_ids`` limits the evaluation to those images (default: all images of the JSON).
    With no detections at all, every number is 0 (COCOeval cannot load an empty result list;
    its AP would be 0 where there is ground truth). ``verbose`` prints COCOeval's own table.
    """
    from pycocotools.cocoeval import COCOeval

    gt = coco_ground_truth(ground_truth)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        # Mask results without their boxes: pycocotools' loadRes would take a result's area
        # from its box when it has one, putting masks in the wrong size range (APs/APm/APl).
        typed = results if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results
                                                    if "segmentation" in r]
        if not typed:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()) as quiet:
            dt = gt.loadRes(copy.deepcopy(typed))
            evaluator = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(int(i) for i in image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        if verbose:
            print(f"COCOeval {iou_type}:\n" + "\n".join(line for line in quiet.getvalue().splitlines() if line.startswith(" Average")))
        metrics.update({f"{iou_type}_{name}": float(v) for name, v in zip(STAT_NAMES, evaluator.stats)})
    return metrics


@torch.no_grad()
def predict_coco_results(model, dataset, indices: Sequence[int] | None = None, batch_size: int = 4,
                         device: torch.device | str = "cpu", progress: bool = False) -> list[dict]:
    """The model's detections on ``dataset`` (a maskray.pipeline.train.coco.CocoDataset), as COCO results."""
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch")
    results: list[dict] = []
    try:
        for batch in batches:
            images = [dataset.read_image(i).to(device) for i in batch]
            for index, detection in zip(batch, model(images)):
                results += detections_to_coco_results(dataset.images[index].id, detection, dataset.category_ids)
    finally:
        model.train(was_training)
    return results


def write_results(results: list[dict], url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """The COCO results JSON (a list of detections), at a local path or fsspec URL, written atomically."""
    from maskray.pipeline.storage import open_url, write_bytes_atomically

    write_bytes_atomically(*open_url(url, storage_options), json.dumps(results).encode())


def format_metrics(metrics: Mapping[str, float]) -> str:
    """A small table: one row per IoU type, AP, AP50, AP75, APs, APm, APl."""
    lines = [f"{'':6}{'AP':>7}{'AP50':>7}{'AP75':>7}{'APs':>7}{'APm':>7}{'APl':>7}"]
    for iou_type in IOU_TYPES:
        if f"{iou_type}_AP" in metrics:
            values = "".join(f"{metrics[f'{iou_type}_{n}']:>7.3f}" for n in STAT_NAMES[:6])
            lines.append(f"{iou_type:6}{values}")
    return "\n".join(lines)
