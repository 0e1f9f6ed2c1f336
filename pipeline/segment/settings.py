"""What a segmentation job is given: the ``maskray segment`` options, with their defaults and help.

``SegmentJob`` is the one statement of them: the command line is made from its fields
(maskray.jobs.arguments), which parse plain numbers, and ``validate`` is the one home of their
ranges, for the command line and callers of ``run_segment`` alike. This module imports nothing
heavy (no torch): ``maskray segment --help`` comes back at once.
"""

from dataclasses import dataclass, field
from typing import Any

from maskray.pipeline.limits import DEFAULT_MAX_PIXELS
from maskray.pipeline.options import STORAGE_OPTIONS_HELP, storage_options
from maskray.pipeline.storage import absolute_url


@dataclass
class SegmentJob:
    """Everything a segmentation job is given (the ``maskray segment`` arguments)."""

    input: str = field(metadata={
        "positional": True, "metavar": "INPUT",
        "help": "images: a prefix, a glob, or a .txt/.parquet file listing them (any fsspec URL)"})
    output: str = field(metadata={
        "positional": True, "metavar": "OUTPUT",
        "help": "where the Parquet output goes (any fsspec URL); rerun to resume"})
    weights: str = field(metadata={
        "metavar": "CKPT", "help": "a maskray checkpoint or a torchvision Mask R-CNN state dict"})
    storage_options: dict[str, Any] = field(default_factory=dict, metadata={
        "type": storage_options, "metavar": "JSON|@FILE", "help": STORAGE_OPTIONS_HELP})
    batch_size: int = field(default=2, metadata={"help": "images per model call (default %(default)s)"})
    shard_size: int = field(default=64, metadata={
        "help": "images per shard, the unit of work and resume (default %(default)s)"})
    num_actors: int | None = field(default=None, metadata={
        "help": "model actors (default: one per GPU, else as many as the CPUs allow)"})
    cpus_per_actor: int | None = field(default=None, metadata={
        "help": "CPUs (torch threads) per actor without GPUs (default 2, capped at the largest node)"})
    score_threshold: float | None = field(default=None, metadata={
        "help": "keep detections scoring at least this (default: the model's box_score_thresh)"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": f"refuse images larger than this many pixels, against decompression bombs (default {DEFAULT_MAX_PIXELS:,})"})
    read_threads: int = field(default=8, metadata={
        "help": "images each actor reads and decodes at once (default %(default)s)"})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join (default: RAY_ADDRESS, else a local cluster)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})
    actor_start_timeout: float = field(default=600.0, metadata={
        "help": "seconds to wait for the model actors to start before the job gives up (default %(default)s)"})

    def __post_init__(self) -> None:
        # Resolved where the user typed them: the actors run in folders of their own.
        self.input, self.output, self.weights = (absolute_url(u) for u in (self.input, self.output, self.weights))

    def validate(self) -> None:
        """The one check of the values' ranges (the command line parses plain numbers): ValueError."""
        for name in ("batch_size", "shard_size", "max_pixels", "read_threads", "num_actors", "cpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:  # None: num_actors and cpus_per_actor left to the cluster
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if not self.actor_start_timeout > 0:
            raise ValueError(f"actor_start_timeout must be positive, got {self.actor_start_timeout}")

    def overrides(self) -> dict[str, Any]:
        return {} if self.score_threshold is None else {"box_score_thresh": float(self.score_threshold)}

    def worker_options(self):
        """The options of each actor's ShardWorker."""
        from maskray.pipeline.segment.worker import WorkerOptions  # imports torch: only where a job runs

        return WorkerOptions(batch_size=self.batch_size, max_pixels=self.max_pixels, read_threads=self.read_threads)
