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

from maskray.pipeline.options import (
    PRECISIONS,
    STORAGE_OPTIONS_HELP,
    GatherPairs,
    check_precision,
    json_key_value,
    storage_options,
)
from maskray.pipeline.storage import absolute_url, public_url
from maskray.pipeline.weights import NAMES_HELP, weights_location

RUN_NAME = "checkpoints"  # Ray Train's run folder inside the output
CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the reported checkpoints
MODEL_FILE = "model.pt"
SETTINGS_FILE = "settings.json"
PRESETS = ("light", "resnet50_fpn")
SCHEDULES = ("step", "cosine")
NORMS = ("auto", "frozen", "batch")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")  # maskray.model.checkpoint.WEIGHTS_DTYPES, without torch

# torchvision's reference recipe: lr 0.02 for 16 images per step (8 GPUs x 2), scaled linearly
# to the run's total batch (Goyal et al., "Accurate, Large Minibatch SGD"), the warm-up kept.
REFERENCE_LR, REFERENCE_BATCH = 0.02, 16

# The fields that name files or folders.
PATHS = ("train_json", "train_images", "val_json", "val_images", "output", "init")

# The sections of ``maskray train --help``.
DATA = "data (paths or fsspec URLs: s3://, gs://, file://, ...)"
WORKERS = "workers"
OPTIMISATION = "optimisation"
MODEL = "model"


def _option(help: str, group: str | None = None, **argparse: Any) -> dict[str, Any]:
    """A field's metadata: how it is given to ``maskray train`` (see maskray.jobs.arguments)."""
    return {"help": help, **({"group": group} if group else {}), **argparse}


@dataclass
class TrainSettings:
    """Everything a training run is made of: the ``maskray train`` options, made from these fields."""

    train_json: str = field(metadata=_option("COCO instances JSON of the training set", DATA))
    train_images: str = field(metadata=_option(
        "folder or prefix that the JSON's file_name values are relative to", DATA))
    output: str = field(metadata=_option("folder or bucket prefix for checkpoints, metrics and model.pt", DATA))
    val_json: str | None = field(default=None, metadata=_option(
        "COCO instances JSON of a validation set (AP after every epoch)", DATA))
    val_images: str | None = field(default=None, metadata=_option("images of the validation set", DATA))
    workers: int = field(default=1, metadata=_option("Ray Train workers (DDP replicas); default %(default)s", WORKERS))
    gpu: bool = field(default=False, metadata=_option("one GPU per worker (NCCL); AMP on by default", WORKERS))
    cpus_per_worker: int | None = field(default=None, metadata=_option(
        "CPU slots and torch threads per worker (default: this machine's cores / workers)", WORKERS))
    epochs: int = field(default=12, metadata=_option(
        "passes over the training set (default %(default)s)", OPTIMISATION))
    batch_size: int = field(default=2, metadata=_option(
        "images per worker per step (default %(default)s)", OPTIMISATION))
    lr: float | None = field(default=None, metadata=_option(
        f"base learning rate of SGD (default: {REFERENCE_LR} x workers x batch size / {REFERENCE_BATCH}, "
        "the linear scaling rule)", OPTIMISATION))
    momentum: float = field(default=0.9, metadata=_option("SGD momentum (default %(default)s)", OPTIMISATION))
    weight_decay: float = field(default=1e-4, metadata=_option("SGD weight decay (default %(default)s)", OPTIMISATION))
    schedule: str = field(default="step", metadata=_option(
        "decay after the warm-up (default %(default)s)", OPTIMISATION, choices=SCHEDULES))
    lr_steps: tuple[int, ...] = field(default=(), metadata=_option(
        "epochs after which the step schedule multiplies lr by --lr-gamma (default: 2/3 and 8/9 of the run)",
        OPTIMISATION, type=int, nargs="+", metavar="EPOCH"))
    lr_gamma: float = field(default=0.1, metadata=_option(
        "what the step schedule multiplies lr by (default %(default)s)", OPTIMISATION))
    warmup_iters: int = field(default=500, metadata=_option(
        "steps of linear warm-up (default %(default)s)", OPTIMISATION))
    warmup_factor: float = field(default=1e-3, metadata=_option(
        "lr multiple the warm-up starts from (default %(default)s)", OPTIMISATION))
    clip_grad_norm: float | None = field(default=None, metadata=_option(
        "clip the gradient's total norm to this (default: no clipping)", OPTIMISATION))
    amp: bool | None = field(default=None, metadata=_option(  # None: on with GPUs
        "no mixed precision on GPUs (the same as --precision fp32)", OPTIMISATION, flag="--no-amp", action="store_false"))
    precision: str = field(default="auto", metadata=_option(
        "autocast of the forward pass: auto (default) is fp16 with loss scaling on GPUs, fp32 on CPUs; bf16 or "
        "fp16 anywhere", OPTIMISATION, choices=PRECISIONS))
    init: str | None = field(default=None, metadata=_option(
        f"start from these weights: a name ({NAMES_HELP}), a checkpoint of ours, or a torchvision Mask R-CNN state dict; "
        "the class heads are re-made if the number of classes differs", MODEL, metavar="CKPT"))
    resume: bool = field(default=False, metadata=_option(
        "continue the run in --output from its latest checkpoint", MODEL))
    preset: str = field(default="light", metadata=_option(
        "architecture without --init (default %(default)s)", MODEL, choices=PRESETS))
    norm: str = field(default="auto", metadata=_option(
        "trunk BatchNorm: frozen (for --init weights) or trained (from scratch); auto picks by --init", MODEL,
        choices=NORMS))
    # The namespace keeps argparse's name for --model-option, model_option (scripts read it).
    model_options: dict[str, Any] = field(default_factory=dict, metadata=_option(
        "a MaskRCNNConfig field, JSON-valued, repeatable: min_size=[128,160] max_size=192 pooler=roi_pool ...", MODEL,
        flag="--model-option", dest="model_option", type=json_key_value, action=GatherPairs, metavar="KEY=VALUE"))
    seed: int = field(default=0, metadata=_option(
        "seed of the initial weights, the flips and the data order (default %(default)s)", OPTIMISATION))
    loader_workers: int = field(default=0, metadata=_option(
        "DataLoader processes per worker (default %(default)s: read in the worker)", WORKERS))
    keep_checkpoints: int | None = field(default=None, metadata=_option(
        "keep only the newest N checkpoints (default: all)", MODEL, metavar="N"))
    max_failures: int = field(default=0, metadata=_option(
        "worker-group restarts Ray Train may do from the latest checkpoint (default %(default)s)", WORKERS))
    export_dtype: str = field(default="float32", metadata=_option(
        "dtype model.pt stores its weights in (float16 halves the file; loading gives float32)", MODEL,
        choices=EXPORT_DTYPES))
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, metadata=_option(
        STORAGE_OPTIONS_HELP, DATA, type=storage_options, metavar="JSON|@FILE"))
    progress: bool = field(default=True, metadata=_option("no progress bar"))

    def __post_init__(self) -> None:
        # Resolved where the user typed them (the driver): Ray Train's workers run in folders of their own.
        for name in PATHS:
            value = getattr(self, name)
            setattr(self, name, weights_location(value) if name == "init" and value else absolute_url(value))
        self.lr_steps = tuple(int(s) for s in self.lr_steps)
        problems = []
        if self.workers < 1:
            problems.append(f"workers must be at least 1 (got {self.workers})")
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1 (got {self.batch_size})")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be 'step' or 'cosine' (got {self.schedule!r})")
        if self.preset not in PRESETS:
            problems.append(f"preset must be one of {PRESETS} (got {self.preset!r})")
        if self.norm not in NORMS:
            problems.append(f"norm must be auto, frozen or batch (got {self.norm!r})")
        if (self.val_json is None) != (self.val_images is None):
            problems.append("validation needs both --val-json and --val-images")
        if self.export_dtype not in EXPORT_DTYPES:
            problems.append(f"export dtype must be float32, float16 or bfloat16 (got {self.export_dtype!r})")
        try:
            check_precision(self.precision)
        except ValueError as error:
            problems.append(str(error))
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            problems.append(f"clip-grad-norm must be positive (got {self.clip_grad_norm})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def base_lr(self) -> float:
        """``lr``, or the linear scaling rule's rate for this run's total batch when it is not given."""
        if self.lr is not None:
            return self.lr
        return REFERENCE_LR * self.workers * self.batch_size / REFERENCE_BATCH

    def public(self) -> dict[str, Any]:
        """The settings as plain data without credentials: for settings.json and logs."""
        data = dataclasses.asdict(self)
        data.pop("storage_options")
        for key in PATHS:
            if data[key] is not None:
                data[key] = public_url(data[key])
        data["lr_steps"] = list(self.lr_steps)
        data["base_lr"] = self.base_lr
        return data


