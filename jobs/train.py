"""``maskray train``: train Mask R-CNN on COCO-format data with Ray Train (see docs/training.md).

    maskray train --train-json URL --train-images URL [--val-json URL --val-images URL]
                  --output URL --workers N [--gpu] [--epochs E] [--batch-size B] [--lr X]
                  [--init CKPT] [--resume]

The options are the fields of ``TrainSettings``, and ``--address``. Also submitted as a Ray
job: ``ray job submit --working-dir . -- python -m maskray.jobs.train ...``.
"""

import argparse
import sys

from maskray.jobs.arguments import add_dataclass_arguments, dataclass_from_namespace
from maskray.jobs.cli import reports_user_errors
from maskray.pipeline.train.settings import WORKERS, TrainSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = add_dataclass_arguments(parser, TrainSettings)
    # Where the driver runs, not what the run is: not a setting (a resumed run may go on elsewhere).
    groups[WORKERS].add_argument("--address",
                                 help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on loopback)")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    settings = dataclass_from_namespace(TrainSettings, args)  # a bad value fails here, before Ray or torch start

    from maskray.pipeline.train.driver import train

    outcome = train(settings, address=args.address)
    metrics = outcome["metrics"]
    shown = {k: metrics[k] for k in ("loss", "bbox_AP", "segm_AP") if metrics.get(k) is not None}
    print(f"maskray train: epoch {outcome['epoch']}, step {outcome['step']}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
