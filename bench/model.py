"""Mask R-CNN end to end, image tensor to COCO RLE: maskray against torchvision, one run.

torchvision's path is what its users write: ``maskrcnn_resnet50_fpn`` in eval mode under
``inference_mode``, then ``masks > 0.5`` on the pasted full-image masks and
``pycocotools.mask.encode``. Ours is ``MaskRCNN(images)``, which returns the RLE itself. Both
hold the same weights (tests/torchvision_reference.py: seeded, BatchNorm calibrated, so that
detections are comparable) and get the same images; the runs alternate between the two so
that the machine's drift hits both alike. Reported: seconds per image (median), images/s, the
ratio, the detections that match (same label, box within 0.05 px, score within 1e-3), and the
peak memory of one inference in a fresh process for each (the process's RSS, sampled every
millisecond during a second inference, above its RSS before it).

    python bench/model.py                        # 480x640 images, min_size 800, 2 threads
    python bench/model.py --arch v2              # maskrcnn_resnet50_fpn_v2 against ours
    python bench/model.py --precision bf16       # ours under bfloat16 autocast, torchvision in float32
    python bench/model.py --min-size 512         # smaller inputs
    python bench/model.py --light                # also the light configuration alone
    python bench/model.py --batch 2 --repeats 3

Under ``--precision bf16`` ours cannot match torchvision's float32 boxes to 0.05 px; the
detections are then also matched as the precision tests match them (same label, box IoU > 0.9).
bfloat16 is fast only on CPUs that compute it natively (AVX512-BF16, AMX); the first line says
whether this one does.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maskray.model import MaskRCNN, MaskRCNNConfig, precision  # noqa: E402
from tests.torchvision_reference import (  # noqa: E402
    calibrated_state_dict,
    calibrated_state_dict_v2,
    torchvision_model,
    torchvision_model_v2,
)


def make_images(batch: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Smooth random blobs rather than pixel noise, so that detections have some structure.
    images = []
    for _ in range(batch):
        coarse = torch.rand(1, 3, height // 16, width // 16, generator=generator)
        images.append(torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0])
    return images


def reference_weights(arch: str) -> dict:
    return calibrated_state_dict_v2() if arch == "v2" else calibrated_state_dict()


def build(which: str, args: argparse.Namespace, weights: dict) -> torch.nn.Module:
    sizes = {"min_size": args.min_size, "max_size": args.max_size}
    if which == "torchvision":
        model = (torchvision_model_v2 if args.arch == "v2" else torchvision_model)(**sizes)
        model.load_state_dict(weights)
        return model.eval()
    if which == "maskray":
        preset = MaskRCNNConfig.resnet50_fpn_v2 if args.arch == "v2" else MaskRCNNConfig.resnet50_fpn
        model = MaskRCNN(preset(min_size=(args.min_size,), max_size=args.max_size, precision=args.precision))
        model.load_state_dict(weights)
        return model.eval().to_inference_layout()
    if which == "light":
        torch.manual_seed(0)
        return MaskRCNN(MaskRCNNConfig.light(precision=args.precision)).eval().to_inference_layout()
    raise ValueError(which)


def infer(which: str, model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """Image tensors to boxes, labels, scores and COCO RLE strings."""
    if which != "torchvision":
        return model(images)
    with torch.inference_mode():
        outputs = model(images)
    for output in outputs:
        binary = (output.pop("masks")[:, 0] > 0.5).numpy().astype(np.uint8)
        output["masks"] = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return outputs


def matched(ours: dict, theirs: dict) -> int:
    used, count = set(), 0
    for i in range(len(ours["boxes"])):
        close = (theirs["boxes"] - ours["boxes"][i]).abs().amax(dim=1) <= 0.05
        close &= (theirs["labels"] == ours["labels"][i]) & ((theirs["scores"] - ours["scores"][i]).abs() <= 1e-3)
        free = [j for j in torch.where(close)[0].tolist() if j not in used]
        if free:
            used.add(free[0])
            count += 1
    return count


def matched_loosely(ours: dict, theirs: dict) -> int:
    """Detections of ``ours`` with one of ``theirs`` of the same label at box IoU > 0.9, each used once."""
    if len(ours["boxes"]) == 0 or len(theirs["boxes"]) == 0:
        return 0
    ious = torchvision.ops.box_iou(ours["boxes"].float(), theirs["boxes"].float())
    ious[ours["labels"][:, None] != theirs["labels"][None, :]] = 0
    used, count = set(), 0
    for i in range(len(ours["boxes"])):
        free = [j for j in torch.where(ious[i] > 0.9)[0].tolist() if j not in used]
        if free:
            used.add(free[0])
            count += 1
    return count


def peak_memory_child(which: str, args: argparse.Namespace) -> None:
    """Runs in a fresh process: one warm inference, then the RSS of a second one sampled each ms."""
    torch.set_num_threads(args.threads)
    weights = reference_weights(args.arch) if which != "light" else {}
    model = build(which, args, weights)
    del weights
    images = make_images(args.batch, args.height, args.width)
    infer(which, model, images)
    # Hand memory freed by the warm-up back to the OS, so that "before" is what is live.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss_bytes()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    infer(which, model, images)
    done.set()
    sampler.join()
    print(json.dumps({"peak_above_start_mb": (peak[0] - before) / 2**20, "start_mb": before / 2**20}))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(which: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--memory-child", which, "--threads", str(args.threads), "--batch", str(args.batch),
               "--height", str(args.height), "--width", str(args.width), "--min-size", str(args.min_size),
               "--max-size", str(args.max_size), "--arch", args.arch, "--precision", args.precision]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each model (median reported)")
    parser.add_argument("--arch", choices=["v1", "v2"], default="v1", help="maskrcnn_resnet50_fpn or its _v2")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="ours (torchvision's stays float32, what its users run)")
    parser.add_argument("--light", action="store_true", help="also time the light configuration")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--memory-child", choices=["torchvision", "maskray", "light"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args)
        return

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, native bfloat16: {'yes' if precision.cpu_has_native_bfloat16() else 'no'}")
    print(f"{args.batch} image(s) of {args.height}x{args.width} per call, min_size {args.min_size}, max_size {args.max_size}, "
          f"median of {args.repeats}; {args.arch}, maskray in {args.precision}, torchvision in fp32")
    weights = reference_weights(args.arch)
    names = ["torchvision", "maskray"] + (["light"] if args.light else [])
    models = {name: build(name, args, weights) for name in names}
    images = make_images(args.batch, args.height, args.width)
    outputs = {name: infer(name, models[name], images) for name in names}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            start = time.perf_counter()
            outputs[name] = infer(name, models[name], images)
            times[name].append((time.perf_counter() - start) / args.batch)

    detections = sum(len(o["boxes"]) for o in outputs["torchvision"])
    same = sum(matched(a, b) for a, b in zip(outputs["maskray"], outputs["torchvision"]))
    loose = sum(matched_loosely(a, b) for a, b in zip(outputs["maskray"], outputs["torchvision"]))
    print(f"detections: torchvision {detections}, maskray {sum(len(o['boxes']) for o in outputs['maskray'])}, "
          f"matching {same} (box within 0.05 px, score within 1e-3), {loose} (same label, box IoU > 0.9)")
    memory = {} if args.no_memory else {name: peak_memory(name, args) for name in names}
    print(f"{'model':<12} {'s/image':>8} {'images/s':>9} {'peak MB':>8}")
    for name in names:
        seconds = statistics.median(times[name])
        peak = f"{memory[name]['peak_above_start_mb']:.0f}" if memory else "-"
        print(f"{name:<12} {seconds:>8.3f} {1 / seconds:>9.3f} {peak:>8}")
    ratio = statistics.median(times["torchvision"]) / statistics.median(times["maskray"])
    print(f"throughput maskray / torchvision: {ratio:.2f}x")
    if memory:
        print(f"peak memory torchvision / maskray: "
              f"{memory['torchvision']['peak_above_start_mb'] / max(memory['maskray']['peak_above_start_mb'], 1):.2f}x")


if __name__ == "__main__":
    main()
