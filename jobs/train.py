"""``maskray train``: train Mask R-CNN on COCO-format data with Ray Train (see docs/training.md).

    maskray train --train-json URL --train-images URL [--val-json URL --val-images URL]
                  --output URL --workers N [--gpu] [--epochs E] [--batch-size B] [--lr X]
                  [--init CKPT] [--resume]

Also submitted as a Ray job: ``ray job submit -- python jobs/train.py ...``.
"""

import argparse
import json
import sys

from maskray.jobs.arguments import storage_options


def _model_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a MaskRCNNConfig field), got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a plain string: roi_pool, resnet34, ...
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return key.strip(), parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (paths or fsspec URLs: s3://, gs://, file://, ...)")
    data.add_argument("--train-json", required=True, help="COCO instances JSON of the training set")
    data.add_argument("--train-images", required=True, help="folder or prefix that the JSON's file_name values are relative to")
    data.add_argument("--val-json", help="COCO instances JSON of a validation set (AP after every epoch)")
    data.add_argument("--val-images", help="images of the validation set")
    data.add_argument("--output", required=True, help="folder or bucket prefix for checkpoints, metrics and model.pt")
    data.add_argument("--storage-options", type=storage_options, default={},
                      help="fsspec options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}' "
                           "(credentials are better left to the environment)")

    run = parser.add_argument_group("workers")
    run.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP replicas); default 1")
    run.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); AMP on by default")
    run.add_argument("--cpus-per-worker", type=int, help="CPU slots and torch threads per worker (default: this machine's cores / workers)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on loopback)")
    run.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker (default 0: read in the worker)")
    run.add_argument("--max-failures", type=int, default=0, help="worker-group restarts Ray Train may do from the latest checkpoint")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=12)
    opt.add_argument("--batch-size", type=int, default=2, help="images per worker per step (default 2)")
    opt.add_argument("--lr", type=float, default=0.02, help="base learning rate of SGD (default 0.02, for 8 workers x 2 images)")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--schedule", choices=("step", "cosine"), default="step", help="decay after the warm-up (default step)")
    opt.add_argument("--lr-steps", type=int, nargs="+", default=(), metavar="EPOCH",
                     help="epochs after which the step schedule multiplies lr by --lr-gamma (default: 2/3 and 8/9 of the run)")
    opt.add_argument("--lr-gamma", type=float, default=0.1)
    opt.add_argument("--warmup-iters", type=int, default=500, help="steps of linear warm-up (default 500)")
    opt.add_argument("--warmup-factor", type=float, default=1e-3, help="lr multiple the warm-up starts from")
    opt.add_argument("--clip-grad-norm", type=float, help="clip the gradient's total norm to this (default: no clipping)")
    opt.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no mixed precision on GPUs")
    opt.add_argument("--seed", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--init", help="start from this checkpoint (ours, or a torchvision Mask R-CNN state dict); "
                                      "the class heads are re-made if the number of classes differs")
    model.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    model.add_argument("--preset", choices=("light", "resnet50_fpn"), default="light", help="architecture without --init (default light)")
    model.add_argument("--norm", choices=("auto", "frozen", "batch"), default="auto",
                       help="trunk BatchNorm: frozen (for --init weights) or trained (from scratch); auto picks by --init")
    model.add_argument("--model-option", type=_model_option, action="append", default=[], metavar="KEY=VALUE",
                       help="a MaskRCNNConfig field, JSON-valued: min_size=[128,160] max_size=192 pooler=roi_pool ...")
    model.add_argument("--keep-checkpoints", type=int, help="keep only the newest N checkpoints (default: all)")
    model.add_argument("--export-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="dtype model.pt stores its weights in (float16 halves the file; loading gives float32)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from maskray.pipeline.errors import TrainingError
    from maskray.pipeline.train.driver import train
    from maskray.pipeline.train.settings import TrainSettings

    try:
        settings = TrainSettings(
            train_json=args.train_json, train_images=args.train_images, output=args.output,
            val_json=args.val_json, val_images=args.val_images, workers=args.workers, gpu=args.gpu,
            cpus_per_worker=args.cpus_per_worker, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule, lr_steps=tuple(args.lr_steps),
            lr_gamma=args.lr_gamma, warmup_iters=args.warmup_iters, warmup_factor=args.warmup_factor,
            clip_grad_norm=args.clip_grad_norm, amp=args.amp, init=args.init, resume=args.resume, preset=args.preset,
            norm=args.norm, model_options=dict(args.model_option), seed=args.seed, loader_workers=args.loader_workers,
            keep_checkpoints=args.keep_checkpoints, max_failures=args.max_failures, export_dtype=args.export_dtype,
            storage_options=args.storage_options, progress=args.progress,
        )
        outcome = train(settings, address=args.address)
    except (ValueError, TrainingError, OSError) as error:
        from maskray.pipeline.storage import redact, secret_values

        print(redact(f"maskray train: error: {error}", secret_values(args.storage_options)), file=sys.stderr)
        return 2
    metrics = outcome["metrics"]
    shown = {k: metrics[k] for k in ("loss", "bbox_AP", "segm_AP") if metrics.get(k) is not None}
    print(f"maskray train: epoch {outcome['epoch']}, step {outcome['step']}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
