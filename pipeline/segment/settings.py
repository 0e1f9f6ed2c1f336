"""What a segmentation job is given: the ``maskray segment`` arguments, with their defaults."""

from dataclasses import dataclass, field
from typing import Any

from maskray.pipeline.decode import DEFAULT_MAX_PIXELS
from maskray.pipeline.segment.worker import WorkerOptions


@dataclass
class SegmentJob:
    """Everything a segmentation job is given (the ``maskray segment`` arguments)."""

    input: str
    output: str
    weights: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 2
    shard_size: int = 64
    num_actors: int | None = None  # default: one per GPU, or as many as the CPUs allow
    cpus_per_actor: int | None = None  # default: 2 (capped at the largest node)
    score_threshold: float | None = None  # default: the model's box_score_thresh
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_threads: int = 8
    address: str | None = None  # a Ray cluster to join; default RAY_ADDRESS, else a local one
    progress: bool = True
    actor_start_timeout: float = 600.0

    def validate(self) -> None:
        for name in ("batch_size", "shard_size", "max_pixels", "read_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_actors", "cpus_per_actor"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")

    def overrides(self) -> dict[str, Any]:
        return {} if self.score_threshold is None else {"box_score_thresh": float(self.score_threshold)}

    def worker_options(self) -> WorkerOptions:
        return WorkerOptions(batch_size=self.batch_size, max_pixels=self.max_pixels, read_threads=self.read_threads)
