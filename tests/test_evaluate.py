"""COCO evaluation (pipeline/train/evaluation.py, maskray evaluate) agrees with COCOeval run directly
on the same results file.

Oracle: pycocotools' COCO.loadRes + COCOeval, called here by hand on the JSON files written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskray.pipeline.train.evaluation import STAT_NAMES, coco_evaluate, detections_to_coco_results, write_results
from maskray.pipeline.train.shapes import write_shapes

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "model" / "weights" / "shapes_light.pt"


def cocoeval_by_hand(gt_path: str, results_path: str, iou_type: str) -> np.ndarray:
    gt = COCO(gt_path)
    evaluator = COCOeval(gt, gt.loadRes(results_path), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


@pytest.fixture(scope="module")
def shapes_truth(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-shapes")
    write_shapes(str(root), 12, seed=21, size=(96, 80))
    return root


def imperfect_results(truth: dict, seed: int) -> list[dict]:
    """Detections made from the ground truth with errors of every kind: shifted boxes, masks
    with pixels lost, wrong classes, misses, false alarms, and random scores."""
    rng = np.random.default_rng(seed)
    results = []
    images = {i["id"]: i for i in truth["images"]}
    for annotation in truth["annotations"]:
        if rng.random() < 0.15:
            continue  # a miss
        image = images[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        shift = rng.normal(0, 2, 4)
        rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
        mask = mask_util.decode(rle)
        mask[rng.random(mask.shape) < 0.2] = 0  # lose pixels
        category = annotation["category_id"] if rng.random() > 0.1 else int(rng.integers(1, 6))
        encoded = mask_util.encode(np.asfortranarray(mask))
        results.append({"image_id": image["id"], "category_id": category, "score": float(rng.random()),
                        "bbox": [x + shift[0], y + shift[1], max(1.0, w + shift[2]), max(1.0, h + shift[3])],
                        "segmentation": {"size": encoded["size"], "counts": encoded["counts"].decode()}})
    for image in truth["images"][::3]:  # false alarms
        mask = np.zeros((image["height"], image["width"]), np.uint8, order="F")
        mask[5:20, 5:30] = 1
        encoded = mask_util.encode(mask)
        results.append({"image_id": image["id"], "category_id": 2, "score": float(rng.random()),
                        "bbox": [5.0, 5.0, 25.0, 15.0], "segmentation": {"size": encoded["size"], "counts": encoded["counts"].decode()}})
    return results


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_cocoeval_on_the_same_results_file(shapes_truth, tmp_path, seed):
    gt_path = str(shapes_truth / "annotations.json")
    truth = json.loads(Path(gt_path).read_text())
    results = imperfect_results(truth, seed)
    results_path = str(tmp_path / "results.json")
    write_results(results, results_path)
    ours = coco_evaluate(truth, json.loads(Path(results_path).read_text()))
    # COCO's results format: a mask result has no box (with one, loadRes would take the
    # result's area from the box, and size ranges would be the box's).
    segm_path = str(tmp_path / "segm-results.json")
    Path(segm_path).write_text(json.dumps([{k: v for k, v in r.items() if k != "bbox"} for r in results]))
    for iou_type, path in (("bbox", results_path), ("segm", segm_path)):
        expected = cocoeval_by_hand(gt_path, path, iou_type)
        assert [ours[f"{iou_type}_{name}"] for name in STAT_NAMES] == expected.tolist()
    # A ground truth without areas and boxes (other tools leave them out) gives the same numbers.
    bare = {**truth, "annotations": [{k: v for k, v in a.items() if k not in ("area", "bbox")} for a in truth["annotations"]]}
    assert coco_evaluate(bare, results) == ours
    # Not a degenerate case: the errors cost AP, and there is AP to cost.
    assert 0.2 < ours["segm_AP"] < 0.95 and 0.2 < ours["bbox_AP"] < 0.95


def test_no_detections_give_zero_ap(shapes_truth):
    truth = json.loads((shapes_truth / "annotations.json").read_text())
    metrics = coco_evaluate(truth, [])
    assert metrics["segm_AP"] == metrics["bbox_AP"] == 0.0


def test_detections_become_coco_results():
    masks = [{"size": [20, 30], "counts": "abc"}, {"size": [20, 30], "counts": "def"}]
    detection = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.5, 0.5, 3.5, 9.5]]), "labels": torch.tensor([2, 1]),
                 "scores": torch.tensor([0.9, 0.25]), "masks": masks}
    results = detections_to_coco_results(7, detection, category_ids=[3, 8])
    assert results == [
        {"image_id": 7, "category_id": 8, "bbox": [1.0, 2.0, 10.0, 5.0], "score": pytest.approx(0.9), "segmentation": masks[0]},
        {"image_id": 7, "category_id": 3, "bbox": [0.5, 0.5, 3.0, 9.0], "score": pytest.approx(0.25), "segmentation": masks[1]},
    ]


def test_evaluate_job_prints_what_cocoeval_gives_on_its_results_file(tmp_path, capsys):
    """The job end to end with the demo model on held-out shapes: its printed AP is COCOeval's
    on the results JSON it wrote, and the demo model is good at its task."""
    from maskray.jobs import evaluate

    write_shapes(str(tmp_path / "held-out"), 10, seed=777, size=(160, 128))
    gt_path = str(tmp_path / "held-out" / "annotations.json")
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--weights", str(DEMO_WEIGHTS), "--json", gt_path, "--images", str(tmp_path / "held-out" / "images"),
                              "--results", str(tmp_path / "results.json"), "--no-progress"])
    assert evaluate.run(args) == 0
    printed = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in capsys.readouterr().out.splitlines()
               if line.startswith(("bbox", "segm"))}
    # COCOeval by hand scores masks on mask results without their boxes (COCO's results format).
    segm_path = tmp_path / "segm-results.json"
    segm_path.write_text(json.dumps([{k: v for k, v in r.items() if k != "bbox"}
                                     for r in json.loads((tmp_path / "results.json").read_text())]))
    for iou_type, path in (("bbox", tmp_path / "results.json"), ("segm", segm_path)):
        expected = cocoeval_by_hand(gt_path, str(path), iou_type)
        assert printed[iou_type] == pytest.approx(expected[:6], abs=5e-4)  # printed to 3 decimals
    assert printed["segm"][0] > 0.4


def test_evaluate_job_refuses_a_model_of_other_classes(tmp_path, capsys):
    from maskray.jobs import evaluate
    from maskray.model import MaskRCNN, MaskRCNNConfig

    write_shapes(str(tmp_path / "set"), 1, seed=1, size=(64, 64))
    MaskRCNN(MaskRCNNConfig.light(3, min_size=(64,), max_size=64)).save(tmp_path / "other.pt")
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--weights", str(tmp_path / "other.pt"), "--json", str(tmp_path / "set" / "annotations.json"),
                              "--images", str(tmp_path / "set" / "images"), "--no-progress"])
    assert evaluate.run(args) == 2
    assert "the model has 2 classes" in capsys.readouterr().err
