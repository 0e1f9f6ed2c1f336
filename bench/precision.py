"""bfloat16 against float32 inference on a trained model, one run: do the detections agree, and how fast is each?

The demo model (``model/weights/shapes_light.pt``, trained) on held-out shapes images (seed 3,
never trained on), once in float32 and once under bfloat16 autocast, the two alternating image
by image. Reported: images/s of each and their ratio; of the float32 detections scoring at least
``--min-score``, the share that bfloat16 also finds (same label, box IoU > 0.9) and the mean mask
IoU of those pairs; and whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), without
which bfloat16 is emulated and slower. AP is ``maskray evaluate --precision`` (BENCHMARKS.md).

    python bench/precision.py                  # 100 images of 160x128
    python bench/precision.py --images 200 --threads 2
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maskray.model import MaskRCNN, precision  # noqa: E402
from maskray.pipeline.train.shapes import make_image  # noqa: E402

WEIGHTS = ROOT / "model" / "weights" / "shapes_light.pt"


def agreement(reference: dict, other: dict, min_score: float) -> tuple[int, int, list[float]]:
    """(reference detections >= min_score, those ``other`` has too, the mask IoUs of the pairs)."""
    keep = reference["scores"] >= min_score
    boxes, labels = reference["boxes"][keep], reference["labels"][keep]
    masks = [m for m, k in zip(reference["masks"], keep.tolist()) if k]
    if len(boxes) == 0:
        return 0, 0, []
    if len(other["boxes"]) == 0:
        return len(boxes), 0, []
    ious = torchvision.ops.box_iou(boxes.float(), other["boxes"].float())
    ious[labels[:, None] != other["labels"][None, :]] = 0
    used, found, mask_ious = set(), 0, []
    for i in range(len(boxes)):
        free = [j for j in torch.where(ious[i] > 0.9)[0].tolist() if j not in used]
        if free:
            used.add(free[0])
            found += 1
            mask_ious.append(float(mask_util.iou([masks[i]], [other["masks"][free[0]]], [0])[0, 0]))
    return len(boxes), found, mask_ious


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-score", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {}
    for name in ("fp32", "bf16"):
        model = MaskRCNN.load(WEIGHTS)
        model.config = model.config.replace(precision=name)
        models[name] = model.eval().to_inference_layout()
    images = []
    for index in range(args.images):
        data, _ = make_image(3, index, 160, 128)
        images.append(torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1))
    for model in models.values():  # warm-up
        model(images[:1])

    seconds = {name: [] for name in models}
    total = found = 0
    mask_ious: list[float] = []
    for image in images:
        results = {}
        for name, model in models.items():
            start = time.perf_counter()
            [results[name]] = model([image])
            seconds[name].append(time.perf_counter() - start)
        n, f, ious = agreement(results["fp32"], results["bf16"], args.min_score)
        total, found, mask_ious = total + n, found + f, mask_ious + ious

    print(f"torch {torch.__version__}, {args.threads} threads, native bfloat16: "
          f"{'yes' if precision.cpu_has_native_bfloat16() else 'no'}")
    print(f"{args.images} held-out shapes images (160x128, seed 3), the demo model")
    for name in models:
        print(f"{name}: {statistics.median(seconds[name]) * 1000:.1f} ms/image (median), "
              f"{len(images) / sum(seconds[name]):.1f} images/s")
    print(f"speed bf16 / fp32: {sum(seconds['fp32']) / sum(seconds['bf16']):.2f}x")
    print(f"fp32 detections scoring >= {args.min_score}: {total}; found by bf16 (same label, box IoU > 0.9): "
          f"{found} ({found / max(total, 1):.1%}); mean mask IoU of the pairs {statistics.fmean(mask_ious or [0]):.4f}")


if __name__ == "__main__":
    main()
