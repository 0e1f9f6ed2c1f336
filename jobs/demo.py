"""``maskray demo``: the main job on an embedded default, start to finish.

Makes a sample set of images (synthetic shapes, deterministic), segments them with the shipped
demo model on a local Ray cluster into Parquet in a local folder, prints a DuckDB query over
the output, and draws one image's instances into a PNG. It is what ``make demo`` runs on a
fresh machine; every step is the one a user runs on a bucket.
"""

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from maskray.jobs.arguments import dataclass_from_namespace
from maskray.jobs.cli import reports_user_errors
from maskray.pipeline.options import positive_int

ROOT = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = ROOT / "model" / "weights" / "shapes_light.pt"
SHARD_SIZE = 8  # a few shards of the 24 images, so that the progress bar moves
QUERIES = {
    "instances per class": "SELECT label_name, count(*) AS instances, round(avg(score), 3) AS mean_score, "
    "round(avg(area)) AS mean_area FROM instances GROUP BY 1 ORDER BY 1",
    "images": "SELECT status, count(*) AS images, sum(instances) AS instances FROM images GROUP BY 1",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("maskray-demo"),
                        help="where the demo writes (default ./maskray-demo)")
    parser.add_argument("--images", type=positive_int, default=24, help="sample images to make (default 24)")
    parser.add_argument("--weights", default=None,
                        help=f"weights to use (default: the demo model, {DEMO_WEIGHTS.relative_to(ROOT)})")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from maskray.jobs.cli import main as maskray
    from maskray.pipeline.errors import JobError
    from maskray.pipeline.segment.job import run_segment
    from maskray.pipeline.segment.manifest import MANIFEST_FILE
    from maskray.pipeline.segment.settings import SegmentJob
    from maskray.pipeline.train.shapes import write_shapes

    directory: Path = args.dir
    images, output, overlay = directory / "shapes", directory / "output", directory / "overlay.png"
    weights = args.weights or _default_weights(directory)

    print(f"1. sample images: {args.images} synthetic shape images in {images}/images")
    write_shapes(str(images), args.images, seed=2026)
    if output.exists():
        # The demo starts over (a real job resumes instead), but deletes only a maskray output.
        if not (output / MANIFEST_FILE).exists():
            raise JobError(f"{output} exists and is not a maskray output; choose another --dir")
        shutil.rmtree(output)

    # The job is made from the very arguments it prints, so the line is true as printed.
    segment_args = [str(images / "images"), str(output), "--weights", str(weights), "--shard-size", str(SHARD_SIZE)]
    print(f"2. segment: local Ray cluster, weights {weights}, Parquet into {output}")
    print(f"   (the same as: maskray segment {shlex.join(segment_args)})")
    job = dataclass_from_namespace(SegmentJob, segment_parser().parse_args(segment_args))
    summary = run_segment(job)
    print(summary.describe())
    if not summary.complete:
        return 1

    for title, sql in QUERIES.items():
        print(f"\n3. query ({title}): maskray query {output} \"{sql}\"")
        maskray(["query", str(output), sql])

    first = sorted((images / "images").iterdir())[0]
    print(f"\n4. picture: maskray show {output} {first.name} -o {overlay}")
    maskray(["show", str(output), first.name, "-o", str(overlay)])
    if weights != str(DEMO_WEIGHTS) and args.weights is None:
        print("\nNOTE: these weights are UNTRAINED (no demo model in model/weights/): the masks above are noise.")
    return 0


def segment_parser() -> argparse.ArgumentParser:
    """``maskray segment``'s own parser."""
    from maskray.jobs import segment

    parser = argparse.ArgumentParser(prog="maskray segment")
    segment.add_arguments(parser)
    return parser


def _default_weights(directory: Path) -> str:
    if DEMO_WEIGHTS.exists():
        return str(DEMO_WEIGHTS)
    # No trained model shipped (yet): an untrained light model, said loudly.
    import torch

    from maskray.model import MaskRCNN, MaskRCNNConfig
    from maskray.pipeline.train.shapes import coco_categories

    names = ("__background__", *(c["name"] for c in coco_categories()))
    path = directory / "untrained-light.pt"
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    MaskRCNN(MaskRCNNConfig.light(num_classes=len(names), class_names=names)).save(path)
    print(f"NOTE: no demo model at {DEMO_WEIGHTS}; using UNTRAINED weights ({path}): the masks will be noise")
    return str(path)


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
