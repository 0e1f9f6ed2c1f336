"""The settings of a training run (the ``maskray train`` options) and the files a run writes.

Output layout (a local folder or a bucket prefix)::

    OUTPUT/checkpoints/epoch-0001/checkpoint.pt   config, class names, weights, optimizer,
                                                   scheduler, scaler, epoch, step, metrics
    OUTPUT/metrics.csv, OUTPUT/metrics.png         one row / point per epoch
    OUTPUT/model.pt                                the final model, as ``maskray segment --weights`` reads
    OUTPUT/settings.json                           the settings of the run (no credentials)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from maskray.pipeline.errors import TrainingError  # noqa: F401  (raised by the modules of a run)
from maskray.pipeline.storage import public_url

RUN_NAME = "checkpoints"  # Ray Train's run folder inside the output
CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the reported checkpoints
MODEL_FILE = "model.pt"
SETTINGS_FILE = "settings.json"
PRESETS = ("light", "resnet50_fpn")


@dataclass
class TrainSettings:
    """Everything a training run is made of (the ``maskray train`` options)."""

    train_json: str
    train_images: str
    output: str
    val_json: str | None = None
    val_images: str | None = None
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: int | None = None  # CPU slots per worker; also its torch threads
    epochs: int = 12
    batch_size: int = 2  # images per worker per step
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"  # "step" or "cosine"
    lr_steps: tuple[int, ...] = ()  # epochs after which lr *= lr_gamma; default 2/3 and 8/9 of the run
    lr_gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 1e-3
    clip_grad_norm: float | None = None
    amp: bool | None = None  # None: on with GPUs
    init: str | None = None  # our checkpoint or a torchvision state dict
    resume: bool = False
    preset: str = "light"
    norm: str = "auto"  # "frozen", "batch", or "auto": batch from scratch, frozen from --init
    model_options: dict[str, Any] = field(default_factory=dict)  # MaskRCNNConfig fields
    seed: int = 0
    loader_workers: int = 0
    keep_checkpoints: int | None = None  # None keeps all
    max_failures: int = 0
    export_dtype: str = "float32"
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    progress: bool = True

    def __post_init__(self) -> None:
        self.lr_steps = tuple(int(s) for s in self.lr_steps)
        problems = []
        if self.workers < 1:
            problems.append(f"workers must be at least 1 (got {self.workers})")
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1 (got {self.batch_size})")
        if not self.lr > 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if self.schedule not in ("step", "cosine"):
            problems.append(f"schedule must be 'step' or 'cosine' (got {self.schedule!r})")
        if self.preset not in PRESETS:
            problems.append(f"preset must be one of {PRESETS} (got {self.preset!r})")
        if self.norm not in ("auto", "frozen", "batch"):
            problems.append(f"norm must be auto, frozen or batch (got {self.norm!r})")
        if (self.val_json is None) != (self.val_images is None):
            problems.append("validation needs both --val-json and --val-images")
        if self.export_dtype not in ("float32", "float16", "bfloat16"):
            problems.append(f"export dtype must be float32, float16 or bfloat16 (got {self.export_dtype!r})")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            problems.append(f"clip-grad-norm must be positive (got {self.clip_grad_norm})")
        if problems:
            raise ValueError("; ".join(problems))

    def public(self) -> dict[str, Any]:
        """The settings as plain data without credentials: for settings.json and logs."""
        data = dataclasses.asdict(self)
        data.pop("storage_options")
        for key in ("train_json", "train_images", "output", "val_json", "val_images", "init"):
            if data[key] is not None:
                data[key] = public_url(data[key])
        data["lr_steps"] = list(self.lr_steps)
        return data


