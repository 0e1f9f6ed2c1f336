"""``maskray evaluate``: COCO bbox and segm AP of a model on a COCO-format set.

    maskray evaluate --weights CKPT --json URL --images URL [--results OUT.json]

Runs the model over every image of the JSON, scores the detections with pycocotools' COCOeval
and prints its AP table; ``--results`` also writes the detections as a COCO results JSON.
"""

import argparse
import sys

from maskray.jobs.arguments import add_storage_options_argument
from maskray.jobs.cli import reports_user_errors
from maskray.pipeline.options import PRECISION_HELP, PRECISIONS, positive_int
from maskray.pipeline.weights import NAMES_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, metavar="NAME|CKPT",
                        help=f"published weights by name ({NAMES_HELP}), a maskray checkpoint (model.pt of maskray "
                             "train) or a torchvision state dict, any URL")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument("--json", required=True, help="COCO instances JSON with the ground truth")
    parser.add_argument("--images", required=True, help="folder or prefix the JSON's file_name values are relative to")
    parser.add_argument("--results", help="also write the detections here, as a COCO results JSON")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    parser.add_argument("--gpu", action="store_true", help="run the model on the GPU")
    add_storage_options_argument(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    import torch

    from maskray.pipeline.storage import public_url
    from maskray.pipeline.train.coco import CocoDataset, read_coco_json
    from maskray.pipeline.train.evaluation import coco_evaluate, format_metrics, predict_coco_results, write_results
    from maskray.pipeline.weights import build_model, read_weights

    options = args.storage_options
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    weights = read_weights(args.weights, options)
    model = build_model(weights, {"precision": args.precision}, device=str(device))
    dataset = CocoDataset(args.json, args.images, options)
    if model.config.num_classes != dataset.num_classes:
        raise ValueError(f"the model has {model.config.num_classes - 1} classes {list(model.class_names[1:])}, "
                         f"the JSON {dataset.num_classes - 1} categories {list(dataset.class_names[1:])}")
    if tuple(dataset.class_names[1:]) != tuple(model.class_names[1:]):
        print(f"maskray evaluate: note: the model's classes {list(model.class_names[1:])} are matched to the "
              f"JSON's categories {list(dataset.class_names[1:])} by position")
    results = predict_coco_results(model, dataset, batch_size=args.batch_size, device=device, progress=args.progress)
    if args.results:
        write_results(results, args.results, options)
    metrics = coco_evaluate(read_coco_json(args.json, options), results)
    print(f"maskray evaluate: {len(dataset)} images, {len(results)} detections, weights {weights.name}, "
          f"precision {model.precision_on(device)}")
    print(format_metrics(metrics))
    if args.results:
        print(f"maskray evaluate: COCO results written to {public_url(args.results)}")
    return 0


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
