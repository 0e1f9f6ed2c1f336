"""What a segmentation job is given: the ``maskray segment`` options, with their defaults and help.

``SegmentJob`` is the one statement of them: the command line is made from its fields
(maskray.jobs.arguments), which parse plain numbers, and ``validate`` is the one home of their
ranges, for the command line and callers of ``run_segment`` alike. This module imports nothing
heavy (no torch): ``maskray segment --help`` comes back at once.
"""

from dataclasses import dataclass, field
from typing import Any

from maskray.pipeline.limits import DEFAULT_MAX_PIXELS
from maskray.pipeline.options import PRECISION_HELP, PRECISIONS, STORAGE_OPTIONS_HELP, check_precision, storage_options
from maskray.pipeline.storage import absolute_url
from maskray.pipeline.weights import DEFAULT_WEIGHTS, NAMES_HELP, weights_location


@dataclass
class SegmentJob:
    """Everything a segmentation job is given (the ``maskray segment`` arguments)."""

    input: str = field(metadata={
        "positional": True, "metavar": "INPUT",
        "help": "images: a prefix, a glob, or a .txt/.parquet file listing them (any fsspec URL)"})
    output: str = field(metadata={
        "positional": True, "metavar": "OUTPUT",
        "help": "where the Parquet output goes (any fsspec URL); rerun to resume"})
    weights: str = field(default=DEFAULT_WEIGHTS, metadata={
        "metavar": "NAME|CKPT", "help": f"published weights by name ({NAMES_HELP}; default %(default)s, torchvision's "
        "best Mask R-CNN), a maskray checkpoint, or a torchvision Mask R-CNN / Faster R-CNN state dict file"})
    storage_options: dict[str, Any] = field(default_factory=dict, metadata={
        "type": storage_options, "metavar": "JSON|@FILE", "help": STORAGE_OPTIONS_HELP})
    batch_size: int | None = field(default=None, metadata={
        "help": "images per model call (default: chosen for the device: 2 on a CPU; on a GPU as many as its "
                "free memory holds at the model's input size, up to 16)"})
    shard_size: int = field(default=64, metadata={
        "help": "images per shard, the unit of work and resume (default %(default)s)"})
    num_actors: int | None = field(default=None, metadata={
        "help": "model actors (default: one per GPU, else as many as the CPUs allow)"})
    cpus_per_actor: int | None = field(default=None, metadata={
        "help": "CPUs (torch threads) per actor without GPUs (default 2, capped at the largest node; "
                "1 gives more images/s where memory allows a model per CPU, see BENCHMARKS.md)"})
    score_threshold: float | None = field(default=None, metadata={
        "help": "keep detections scoring at least this (default: the model's box_score_thresh)"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": f"refuse images larger than this many pixels, against decompression bombs (default {DEFAULT_MAX_PIXELS:,})"})
    read_threads: int = field(default=8, metadata={
        "help": "images each actor reads at once (default %(default)s)"})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join (default: RAY_ADDRESS, else a local cluster)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})
    actor_start_timeout: float = field(default=600.0, metadata={
        "help": "seconds to wait for the model actors to start before the job gives up (default %(default)s)"})
    precision: str = field(default="auto", metadata={
        "choices": PRECISIONS, "help": PRECISION_HELP})
    # Last: SegmentJob's fields may be given by position, so new ones go at the end.
    update: bool = field(default=False, metadata={
        "help": "list INPUT again and add the images that are not in OUTPUT's plan yet, as new shards (committed "
                "shards are kept, and so are the rows of images gone from INPUT); without it a rerun only resumes"})

    def __post_init__(self) -> None:
        # Resolved where the user typed them: the actors run in folders of their own.
        self.input, self.output = absolute_url(self.input), absolute_url(self.output)
        self.weights = weights_location(self.weights)

    def validate(self) -> None:
        """The one check of the values' ranges (the command line parses plain numbers): ValueError."""
        for name in ("batch_size", "shard_size", "max_pixels", "read_threads", "num_actors", "cpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:  # None: num_actors and cpus_per_actor left to the cluster
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        check_precision(self.precision)
        if not self.actor_start_timeout > 0:
            raise ValueError(f"actor_start_timeout must be positive, got {self.actor_start_timeout}")

    def overrides(self) -> dict[str, Any]:
        """The model config fields this job sets (maskray.pipeline.weights.build_model)."""
        changes: dict[str, Any] = {"precision": self.precision}
        if self.score_threshold is not None:
            changes["box_score_thresh"] = float(self.score_threshold)
        return changes

    def worker_options(self):
        """The options of each actor's ShardWorker."""
        from maskray.pipeline.segment.worker import WorkerOptions  # imports torch: only where a job runs

        return WorkerOptions(batch_size=self.batch_size, max_pixels=self.max_pixels, read_threads=self.read_threads)
