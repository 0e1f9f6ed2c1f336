"""Ray Train's cost: training iterations/s of the job with one Ray Train worker divided by
those of a plain single-process loop, on the same data, model, batch and threads, one run.

The plain loop is what one writes without Ray: a DataLoader over the same COCO dataset (same
flip), the same model and SGD, ``loss.backward(); optimizer.step()``. The Ray side is the real
job (``maskray.pipeline.train.driver.train``: TorchTrainer, one worker, checkpoint per epoch). Both run
``--epochs`` epochs over a synthetic shapes set and the throughput of the last epoch is
compared (the first one pays for warm-up: allocator, oneDNN kernels), measured inside the
loop in both; the job's wall time from start to exported model is reported beside it.
Target: ratio >= 0.9.

Ray starts its workers 15 steps nicer than the driver (its ``worker_niceness``), so the plain
loop runs in a child process at that niceness too: on a machine that other work shares, both
then compete for the cores alike. It runs once before and once after the Ray job, and the
ratio is taken against the mean of the two, so that drift in the machine's load hits both.

    python bench/train.py                       # 96 images of 160x128, batch 8, 2 threads
    python bench/train.py --threads 1 --images 48
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from maskray.model import LOSS_NAMES, MaskRCNN
from maskray.pipeline.train.coco import CocoDataset, RandomHorizontalFlip, collate
from maskray.pipeline.train.driver import train
from maskray.pipeline.train.initial_weights import model_config
from maskray.pipeline.train.metrics import read_metrics
from maskray.pipeline.train.schedule import make_optimizer
from maskray.pipeline.train.settings import TrainSettings
from maskray.pipeline.train.shapes import write_shapes

ROOT = Path(__file__).resolve().parents[1]

# The demo model's architecture (model/weights/README.md).
SHAPES_OPTIONS = {"min_size": (112, 144, 128), "max_size": 192, "representation_size": 256,
                  "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
                  "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150, "box_batch_size_per_image": 64}


def plain_loop(settings: TrainSettings, threads: int) -> dict[str, list[float]]:
    """Images/s and mean loss of each epoch of a single-process loop without Ray: the job's own data order
    (its sampler and seed), optimiser, schedule and clipping, so that both do the same work.
    Mask R-CNN's cost per step depends on where training is (how many proposals survive, how
    many RoIs are positive), so a loop on another learning-rate schedule is not comparable."""
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    dataset = CocoDataset(settings.train_json, settings.train_images, check_files=False)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=settings.seed)
    loader = torch.utils.data.DataLoader(RandomHorizontalFlip(dataset), batch_size=settings.batch_size, sampler=sampler,
                                         collate_fn=collate)
    model = MaskRCNN(model_config(settings, dataset.class_names, None)).train()
    parameters, optimizer, scheduler = make_optimizer(model, settings, len(loader))
    rates, mean_losses = [], []
    for epoch in range(settings.epochs):
        sampler.set_epoch(epoch)
        started, images, loss_sum = time.perf_counter(), 0, 0.0
        for batch, targets in loader:
            for target in targets:
                target.pop("skipped")
            losses = model(batch, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, settings.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += sum(losses[k].item() for k in LOSS_NAMES)  # the job reads its losses out each step too
            images += len(batch)
        rates.append(images / (time.perf_counter() - started))
        mean_losses.append(loss_sum / len(loader))
    return {"rates": rates, "losses": mean_losses}


RAY_WORKER_NICENESS = 15  # Ray's default worker_niceness


def plain_in_child(args: argparse.Namespace, settings: TrainSettings) -> list[float]:
    """plain_loop in a child process at the niceness Ray gives its workers."""
    import subprocess

    payload = json.dumps({"settings": {k: v for k, v in settings.__dict__.items()}, "threads": args.threads})
    output = subprocess.run([sys.executable, __file__, "--plain-child", payload], check=True, capture_output=True,
                            text=True, preexec_fn=lambda: os.nice(RAY_WORKER_NICENESS)).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the loop and of the Ray worker")
    parser.add_argument("--images", type=int, default=96, help="training images (synthetic shapes)")
    parser.add_argument("--size", default="160x128", help="image size WxH")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each; the last one is compared")
    parser.add_argument("--json", help="also write the result here as JSON")
    parser.add_argument("--plain-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_child:
        payload = json.loads(args.plain_child)
        print(json.dumps(plain_loop(TrainSettings(**payload["settings"]), payload["threads"])))
        return

    from maskray.pipeline.train.shapes import parse_size

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "shapes"
        write_shapes(str(data), args.images, seed=1, size=parse_size(args.size))
        settings = TrainSettings(
            train_json=str(data / "annotations.json"), train_images=str(data / "images"), output=str(Path(folder) / "out"),
            workers=1, cpus_per_worker=args.threads, epochs=args.epochs, batch_size=args.batch_size, lr=0.02,
            warmup_iters=10, model_options=dict(SHAPES_OPTIONS), progress=False,
        )
        plain_before = plain_in_child(args, settings)
        started = time.perf_counter()
        train(settings, log=lambda _: None)
        job_seconds = time.perf_counter() - started
        ray_rows = read_metrics(settings.output)
        ray_rates = [float(row["images_per_s"]) for row in ray_rows]
        ray_losses = [float(row["loss"]) for row in ray_rows]
        plain_after = plain_in_child(args, settings)
    plain = [(a + b) / 2 for a, b in zip(plain_before["rates"], plain_after["rates"])]

    steps_per_epoch = -(-args.images // args.batch_size)
    result = {
        "plain_images_per_s": plain[-1], "ray_images_per_s": ray_rates[-1],
        "plain_iterations_per_s": plain[-1] / args.batch_size, "ray_iterations_per_s": ray_rates[-1] / args.batch_size,
        "ratio": ray_rates[-1] / plain[-1], "ray_job_wall_seconds": job_seconds,
        "steps_per_epoch": steps_per_epoch, "threads": args.threads, "batch_size": args.batch_size, "images": args.images,
        "size": args.size, "epochs": args.epochs, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    result["plain_images_per_s_before_after"] = [plain_before["rates"][-1], plain_after["rates"][-1]]
    # The same work on both sides: the same data order and schedule give the same losses
    # (to float rounding; the DDP-free and Ray-hosted models run the same ops).
    result["mean_loss_per_epoch"] = {"plain": plain_before["losses"], "ray": ray_losses}
    print(f"plain loop : {result['plain_iterations_per_s']:.3f} it/s ({plain[-1]:.2f} images/s; before "
          f"{plain_before['rates'][-1]:.2f}, after {plain_after['rates'][-1]:.2f})")
    print(f"Ray Train  : {result['ray_iterations_per_s']:.3f} it/s ({ray_rates[-1]:.2f} images/s), epochs {[round(r, 2) for r in ray_rates]}; "
          f"job wall time {job_seconds:.1f} s (Ray start, workers, checkpoints, export)")
    print(f"mean loss per epoch: plain {[round(x, 4) for x in plain_before['losses']]}, "
          f"Ray Train {[round(x, 4) for x in ray_losses]} (the same work when they agree)")
    print(f"ratio Ray / plain: {result['ratio']:.3f} (target >= 0.9)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
