"""Training Mask R-CNN with Ray Train: COCO data at any fsspec URL in, checkpoints and a model out.

The driver (``train``) checks the data and the output, builds the model's config, and runs a
``TorchTrainer`` whose workers each hold a replica of the very model the segmentation job runs
(DDP: gloo on CPUs, NCCL on GPUs). Each worker (``train_worker``) reads its shard of the images
through the shared decode path (``pipeline.coco``), and per epoch:

    SGD steps (warm-up, then step or cosine decay; optional clipping; AMP on GPUs)
    -> losses averaged over workers -> validation AP (each worker a shard, COCOeval on rank 0)
    -> checkpoint via ``ray.train.report`` -> metrics.csv and metrics.png

Output layout (a local folder or a bucket prefix)::

    OUTPUT/checkpoints/epoch-0001/checkpoint.pt   config, class names, weights, optimizer,
                                                   scheduler, scaler, epoch, step, metrics
    OUTPUT/metrics.csv, OUTPUT/metrics.png         one row / point per epoch
    OUTPUT/model.pt                                the final model, as ``maskray segment --weights`` reads
    OUTPUT/settings.json                           the settings of the run (no credentials)

Resuming: Ray Train keeps a record of the reported checkpoints in ``OUTPUT/checkpoints``
(``checkpoint_manager_snapshot.json``), written after each checkpoint's upload has finished;
``resume=True`` continues from the latest recorded one (the step count, schedule and data order
go on where they were). A run killed mid-epoch goes on from the last finished epoch, and a
checkpoint folder that a kill cut short is never loaded, since it was never recorded (the
resumed run writes it again). Starting without ``resume`` on an output that holds a run is an
error, so a run is never overwritten or continued by accident.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from model import LOSS_NAMES, MaskRCNN, MaskRCNNConfig
from model.checkpoint import FORMAT, float32_state_dict, read_torchvision_state_dict, safe_load
from pipeline.cluster import connect_ray
from pipeline.storage import join, open_url, public_url, redact, secret_values

RUN_NAME = "checkpoints"  # Ray Train's run folder inside the output
CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the reported checkpoints
MODEL_FILE = "model.pt"
METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"
SETTINGS_FILE = "settings.json"
# The heads whose shape depends on the number of classes: re-made when that number changes.
CLASS_HEADS = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.",
               "roi_heads.mask_predictor.mask_fcn_logits.")
PRESETS = ("light", "resnet50_fpn")
METRIC_COLUMNS = ("epoch", "step", "lr", "loss", *LOSS_NAMES, "images_per_s", "epoch_seconds",
                  "skipped_annotations", "bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")


class TrainingError(RuntimeError):
    """The run cannot start or go on as asked; the message says why."""


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


# ----------------------------------------------------------------------------------------------
# The model and its starting weights


def fetch_weights(url: str, storage_options: Mapping[str, Any] | None = None) -> io.BytesIO:
    """The bytes of a weights file at a path or fsspec URL, as a file object named by its URL."""
    fs, path = open_url(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TrainingError(f"{public_url(url)}: no such weights file") from None
    buffer = io.BytesIO(data)
    buffer.name = public_url(url)
    return buffer


def read_weights_file(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """A weights file at a path or fsspec URL, read with ``weights_only=True``."""
    return safe_load(fetch_weights(url, storage_options))


def initial_state(init: Any) -> tuple[MaskRCNNConfig | None, dict[str, torch.Tensor]]:
    """(the architecture of ``init`` if it is one of ours, its float32 state dict)."""
    if isinstance(init, dict) and init.get("format") == FORMAT:
        return MaskRCNNConfig.from_dict(init["config"]), float32_state_dict(init)
    return None, read_torchvision_state_dict(init)


def model_config(settings: TrainSettings, class_names: tuple[str, ...], init_config: MaskRCNNConfig | None,
                 init_is_torchvision: bool = False) -> MaskRCNNConfig:
    """The config of the model to train: the preset (or the architecture of ``--init``), the
    data set's classes, the norm, and the user's model options on top."""
    num_classes = len(class_names)
    if init_config is not None:
        base = init_config.replace(num_classes=num_classes, class_names=class_names)
    elif init_is_torchvision:
        base = MaskRCNNConfig.resnet50_fpn(num_classes, class_names)
    else:
        base = getattr(MaskRCNNConfig, settings.preset)(num_classes, class_names)
    norm = settings.norm
    if norm == "auto":
        # Weights trained elsewhere bring statistics to freeze; a trunk from scratch has none.
        norm = "frozen" if (init_config is not None or init_is_torchvision) else "batch"
    options: dict[str, Any] = {"backbone_norm": norm}
    if norm == "batch":
        options["trainable_backbone_layers"] = 5
    options.update(settings.model_options)
    if "min_size" in options and isinstance(options["min_size"], int):
        options["min_size"] = (options["min_size"],)
    try:
        return base.replace(**options)
    except TypeError as error:
        raise TrainingError(f"unknown model option: {error}") from None


def load_initial_weights(model: MaskRCNN, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Loads ``state_dict`` into ``model``; the class-dependent heads are left as initialised when
    their shapes differ (another number of classes). Returns the names of those re-made."""
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    remade = sorted({k.rsplit(".", 1)[0] for k in mismatched if k.startswith(CLASS_HEADS)})
    misfits = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if not k.startswith(CLASS_HEADS)]
    is_remade = tuple(r + "." for r in remade)
    wanted = {k: v for k, v in state_dict.items() if not k.startswith(is_remade) and k not in mismatched}
    # num_batches_tracked: kept by a trained BatchNorm, unknown to a frozen one (and the reverse).
    wanted = {k: v for k, v in wanted.items() if not k.endswith("num_batches_tracked") or k in own}
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if not k.startswith(is_remade) and not k.endswith("num_batches_tracked")]
    if misfits or missing or unexpected:
        raise TrainingError(
            f"the initial weights do not fit this model: shapes {misfits[:3]}, missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (an init checkpoint must be of the same architecture)"
        )
    return remade


def inference_config(config: MaskRCNNConfig) -> MaskRCNNConfig:
    """The exported model's config: a trained BatchNorm becomes a frozen one (the same affine
    map in eval mode), so the file is the standard model that inference and fine-tuning expect."""
    if config.backbone_norm == "frozen":
        return config
    return config.replace(backbone_norm="frozen", trainable_backbone_layers=MaskRCNNConfig.trainable_backbone_layers)


def export_model(checkpoint: Mapping[str, Any], url: str, dtype: str = "float32",
                 storage_options: Mapping[str, Any] | None = None) -> MaskRCNN:
    """Writes the model of a training checkpoint as a plain maskray checkpoint (no optimizer)."""
    config = inference_config(MaskRCNNConfig.from_dict(checkpoint["config"]))
    model = MaskRCNN(config)
    state_dict = {k: v for k, v in float32_state_dict(checkpoint).items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state_dict)
    buffer = io.BytesIO()
    model.save(buffer, weights_dtype=dtype, trained={"epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"),
                                                      "metrics": checkpoint.get("metrics", [])[-1:]})
    fs, path = open_url(url, storage_options)
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The schedule


def steps_at_epochs(epochs: tuple[int, ...], steps_per_epoch: int) -> list[int]:
    return sorted(e * steps_per_epoch for e in epochs)


def default_lr_steps(epochs: int) -> tuple[int, ...]:
    """Decay after 2/3 and 8/9 of the run (torchvision's 16 and 22 of 26 epochs, near enough)."""
    return tuple(sorted({max(1, round(epochs * 2 / 3)), max(1, round(epochs * 8 / 9))} - {epochs}))


def lr_factor(step: int, total_steps: int, warmup_iters: int, warmup_factor: float, schedule: str,
              milestones: list[int], gamma: float) -> float:
    """The learning rate of ``step`` as a multiple of the base rate: a linear warm-up from
    ``warmup_factor``, times a step decay (``gamma`` at each milestone) or a cosine to zero."""
    warm = 1.0
    if step < warmup_iters:
        warm = warmup_factor + (1 - warmup_factor) * step / warmup_iters
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    else:
        decay = gamma ** bisect.bisect_right(milestones, step)
    return warm * decay


def make_optimizer(model: torch.nn.Module, settings: TrainSettings, steps_per_epoch: int):
    """SGD over the trainable parameters and its per-step schedule, as ``settings`` asks.
    Returns (parameters, optimizer, scheduler); bench/train.py's plain loop uses it too."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    total_steps = settings.epochs * steps_per_epoch
    milestones = steps_at_epochs(settings.lr_steps or default_lr_steps(settings.epochs), steps_per_epoch)
    warmup = min(settings.warmup_iters, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, settings.warmup_factor, settings.schedule,
                                          milestones, settings.lr_gamma))
    return parameters, optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# Metrics files


def write_metrics(rows: list[dict[str, Any]], output: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """metrics.csv and metrics.png from all rows so far (rewritten whole: a reader never sees
    half a file on an object store, where files are written at close)."""
    from pipeline.curves import plot_curves

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    fs, root = open_url(output, storage_options)
    with fs.open(join(root, METRICS_CSV), "w") as f:
        f.write(text.getvalue())
    with fs.open(join(root, METRICS_PNG), "wb") as f:
        f.write(plot_curves(rows))


def read_metrics(output: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    fs, root = open_url(output, storage_options)
    with fs.open(join(root, METRICS_CSV), "r") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# The worker


def _progress(total: int, description: str, enabled: bool):
    """A progress bar that Ray draws on the driver's console (tqdm_ray), or none."""
    if not enabled:
        return None
    try:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=description)
    except Exception:  # noqa: BLE001 - a progress bar is never worth failing a run for
        return None


def _move_targets(targets: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def average_batchnorm_statistics(model: torch.nn.Module, world: int) -> None:
    """Every worker's running BatchNorm statistics replaced by their mean over the workers.

    Each replica updates its running averages from its own batches; without this, the workers
    would validate with different statistics, and the checkpoint (rank 0's) would differ from
    what was validated.
    """
    from model.resnet import BatchNorm2d

    for module in model.modules():
        if isinstance(module, BatchNorm2d):
            for buffer in (module.running_mean, module.running_var):
                torch.distributed.all_reduce(buffer)
                buffer.div_(world)


def _evaluate_shard(model: MaskRCNN, dataset, rank: int, world: int, device: torch.device,
                    batch_size: int) -> list[dict] | None:
    """Every worker predicts its share of the validation images; rank 0 gets all results."""
    from pipeline.evaluation import predict_coco_results

    indices = list(range(rank, len(dataset), world))
    results = predict_coco_results(model, dataset, indices, batch_size=batch_size, device=device)
    if world == 1:
        return results
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    return [r for part in gathered for r in part] if rank == 0 else None


RESUME_KEYS = ("config", "optimizer", "scheduler", "epoch", "step")


def read_resume_state(checkpoint) -> dict[str, Any]:
    """The training state in the Ray Train checkpoint a run resumes from.

    Ray Train hands over only a checkpoint it recorded after its upload finished; a file that is
    damaged all the same (a disk error, a hand edit) stops the run with an error naming it, never
    a silent start from scratch or from half a state."""
    where = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    with checkpoint.as_directory() as folder:
        try:
            state = safe_load(os.path.join(folder, CHECKPOINT_FILE))
        except (ValueError, FileNotFoundError) as error:
            raise TrainingError(f"cannot resume from the checkpoint {where}: {error}. Start a new run (another "
                                f"--output) with --init set to an earlier epoch's {CHECKPOINT_FILE}") from None
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainingError(f"cannot resume from the checkpoint {where}: it lacks {missing} (not a training checkpoint)")
    return state


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker training loop that TorchTrainer runs on every worker."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    from pipeline.coco import CocoDataset, RandomHorizontalFlip, collate, read_coco_json
    from pipeline.evaluation import coco_evaluate

    settings = TrainSettings(**loop_config["settings"])
    options = settings.storage_options
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if settings.cpus_per_worker:
        torch.set_num_threads(settings.cpus_per_worker)
    device = ray.train.torch.get_device()
    torch.manual_seed(settings.seed + rank)  # flips differ per worker; DDP gives all rank 0's weights

    dataset = CocoDataset(settings.train_json, settings.train_images, options, check_files=False)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed)
    loader = DataLoader(RandomHorizontalFlip(dataset), batch_size=settings.batch_size, sampler=sampler,
                        collate_fn=collate, num_workers=settings.loader_workers,
                        persistent_workers=settings.loader_workers > 0)
    val_set = None
    if settings.val_json:
        val_set = CocoDataset(settings.val_json, settings.val_images, options, check_files=False)
        val_truth = read_coco_json(settings.val_json, options) if rank == 0 else None

    config = MaskRCNNConfig.from_dict(loop_config["config"])
    resumed = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    if resumed is not None:
        state = read_resume_state(resumed)
        config = MaskRCNNConfig.from_dict(state["config"])  # the run's model, whatever the options now
    model = MaskRCNN(config)
    if state is not None:
        model.load_state_dict(float32_state_dict(state))
    elif loop_config.get("init_state_dict") is not None:
        load_initial_weights(model, loop_config["init_state_dict"])
    model.to(device)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)

    steps_per_epoch = len(loader)
    parameters, optimizer, scheduler = make_optimizer(model, settings, steps_per_epoch)
    use_amp = settings.amp if settings.amp is not None else device.type == "cuda"
    use_amp = use_amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, step, history = 0, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state.get("metrics", []))
        if rank == 0:
            print(f"maskray train: resuming after epoch {start_epoch} (step {step})", flush=True)

    secrets = secret_values(options)
    for epoch in range(start_epoch, settings.epochs):
        sampler.set_epoch(epoch)
        model.train()
        sums = torch.zeros(len(LOSS_NAMES) + 3, dtype=torch.float64)  # losses, images, skipped, steps
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{settings.epochs}", settings.progress and rank == 0)
        started = time.perf_counter()
        for images, targets in loader:
            sums[-2] += sum(int(t.pop("skipped")) for t in targets)
            images = [image.to(device, non_blocking=True) for image in images]
            targets = _move_targets(targets, device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                losses = ddp_model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                parts = {k: v.item() for k, v in losses.items()}
                raise TrainingError(f"the loss is {loss.item()} at step {step} (epoch {epoch + 1}): {parts}; "
                                    "lower --lr or set --clip-grad-norm")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if settings.clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, settings.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            sums[: len(LOSS_NAMES)] += torch.tensor([losses[k].item() for k in LOSS_NAMES], dtype=torch.float64)
            sums[-3] += len(images)
            sums[-1] += 1
            if bar is not None:
                bar.update(1)
        seconds = time.perf_counter() - started
        if bar is not None:
            bar.close()
        if world > 1:
            reduced = sums.to(device)  # NCCL reduces only GPU tensors
            torch.distributed.all_reduce(reduced)  # every worker's losses, images and skips
            sums = reduced.cpu()
            average_batchnorm_statistics(model, world)
        mean = (sums[: len(LOSS_NAMES)] / sums[-1].clamp(min=1)).tolist()
        row: dict[str, Any] = {
            "epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
            "loss": sum(mean), **dict(zip(LOSS_NAMES, mean)),
            "images_per_s": float(sums[-3]) / seconds, "epoch_seconds": seconds,
            "skipped_annotations": int(sums[-2]),
        }
        if val_set is not None:
            results = _evaluate_shard(model, val_set, rank, world, device, settings.batch_size)
            if rank == 0:
                ap = coco_evaluate(val_truth, results)
                row.update({k: ap[k] for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")})
        history.append(row)

        name = f"epoch-{epoch + 1:04d}"
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                model.save(os.path.join(folder, CHECKPOINT_FILE), optimizer=optimizer.state_dict(),
                           scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if use_amp else None,
                           epoch=epoch + 1, step=step, metrics=history, settings=settings.public())
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
            write_metrics(history, settings.output, options)
            summary = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(redact(f"maskray train: {summary}", secrets), flush=True)
        else:
            ray.train.report(row, checkpoint=None, checkpoint_dir_name=name)


# ----------------------------------------------------------------------------------------------
# The driver


def _storage_for_ray(output: str, storage_options: Mapping[str, Any]):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: local paths as they are,
    anything else through a pyarrow wrapper of the fsspec filesystem (with its options)."""
    from pipeline.storage import is_local

    fs, path = open_url(output, storage_options)
    if is_local(fs):
        return os.path.abspath(path), None
    import pyarrow.fs

    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_exists(output: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``output`` holds a Ray Train run with a reported checkpoint."""
    fs, root = open_url(output, storage_options)
    try:
        return any(p.rsplit("/", 1)[-1].startswith("checkpoint_manager_snapshot") for p in fs.find(join(root, RUN_NAME)))
    except FileNotFoundError:
        return False


def recorded_checkpoint(output: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The checkpoint folder (``epoch-NNNN``) a resume of the run in ``output`` starts from: the
    latest one Ray Train recorded, or None when it recorded none.

    Never the newest ``epoch-*`` folder by name: Ray Train records a checkpoint only once its
    files are uploaded whole, so a folder that a kill cut short is there but unrecorded, and
    must not be loaded. A record that cannot be read (cut short itself) is an error that says
    what to do, rather than the one Ray would raise from inside the trainer.
    """
    fs, root = open_url(output, storage_options)
    path = join(root, RUN_NAME, SNAPSHOT_FILE)
    try:
        with fs.open(path, "rb") as f:
            record = json.loads(f.read())
        latest = record.get("latest_checkpoint_result") or (record.get("checkpoint_results") or [None])[-1]
        name = latest["checkpoint_dir_name"] if latest else None
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise TrainingError(
            f"{public_url(join(output.rstrip('/'), RUN_NAME, SNAPSHOT_FILE))}: Ray Train's record of the run's checkpoints "
            f"cannot be read ({type(error).__name__}: {error}); the run cannot be resumed. Start a new run (another "
            f"--output) with --init {public_url(join(output.rstrip('/'), RUN_NAME, 'epoch-NNNN', CHECKPOINT_FILE))} "
            "of the last epoch whose checkpoint loads") from None
    return name


def _worker_reason(error: BaseException) -> BaseException | str:
    """Our own error that a worker raised (a damaged checkpoint, a loss gone NaN), whole and
    without the traceback snippet Ray cuts it into; else Ray's error as it is."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        for _ in range(8):  # through Ray's wrappers (RayTaskError.cause) and chained exceptions
            if cause is None or isinstance(cause, TrainingError):
                break
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, TrainingError):
            return f"worker {rank}: {cause}"
    return error


def train(settings: TrainSettings, address: str | None = None, log=print) -> dict[str, Any]:
    """Runs the training job; returns the last epoch's metrics and where the model went."""
    from pipeline.coco import CocoDataset
    from pipeline.storage import check_reachable

    options = settings.storage_options
    secrets = secret_values(options)

    def say(text: str) -> None:
        log(redact(text, secrets))

    fs, out_root = open_url(settings.output, options)
    check_reachable(settings.output, fs, out_root, must_exist=False)
    # The data is checked here, before any worker starts: the JSON, its categories, every file.
    train_set = CocoDataset(settings.train_json, settings.train_images, options)
    say(f"maskray train: {len(train_set)} training images, {train_set.num_classes - 1} classes "
        f"{list(train_set.class_names[1:])} from {public_url(settings.train_json)}"
        + (f"; {train_set.skipped['crowd']} crowd annotations left out" if train_set.skipped["crowd"] else ""))
    if settings.val_json:
        val_set = CocoDataset(settings.val_json, settings.val_images, options)
        if val_set.class_names != train_set.class_names:
            raise TrainingError(f"the validation categories {list(val_set.class_names[1:])} differ from the training "
                                f"categories {list(train_set.class_names[1:])}")
        say(f"maskray train: {len(val_set)} validation images from {public_url(settings.val_json)}")

    if run_exists(settings.output, options):
        if not settings.resume:
            raise TrainingError(f"{public_url(settings.output)} already holds a training run: pass --resume to "
                                "continue it, or choose another --output")
        latest = recorded_checkpoint(settings.output, options)
        say(f"maskray train: resuming the run in {public_url(settings.output)} from {latest or 'its start'}")
    elif settings.resume:
        say(f"maskray train: nothing to resume in {public_url(settings.output)}; starting afresh")

    init_config, init_state_dict, torchvision_init = None, None, False
    if settings.init:
        init_config, init_state_dict = initial_state(read_weights_file(settings.init, options))
        torchvision_init = init_config is None
    config = model_config(settings, train_set.class_names, init_config, torchvision_init)
    if init_state_dict is not None:
        remade = load_initial_weights(MaskRCNN(config), init_state_dict)  # fails here, not on every worker
        say(f"maskray train: weights from {public_url(settings.init)}"
            + (f"; heads re-made for {config.num_classes} classes: {remade}" if remade else ""))

    fs.makedirs(out_root, exist_ok=True)
    with fs.open(join(out_root, SETTINGS_FILE), "w") as f:
        json.dump({"settings": settings.public(), "config": config.to_dict()}, f, indent=1)

    connect_ray(address, dashboard=True)
    import ray.train
    from ray.train.torch import TorchTrainer

    cpus = settings.cpus_per_worker or max(1, (os.cpu_count() or 1) // settings.workers)
    settings = dataclasses.replace(settings, cpus_per_worker=settings.cpus_per_worker or cpus)
    storage_path, storage_filesystem = _storage_for_ray(settings.output, options)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"settings": {**dataclasses.asdict(settings)}, "config": config.to_dict(),
                           "init_state_dict": init_state_dict},
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=settings.gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Ray Train turns workers' print into log records; plain prints keep the progress bar
            # (tqdm_ray speaks through stdout) and let COCOeval's chatter be silenced.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    say(f"maskray train: {settings.workers} worker(s) x {cpus} CPU{' + 1 GPU' if settings.gpu else ''}, "
        f"{settings.epochs} epochs of batch {settings.batch_size} per worker, output {public_url(settings.output)}")
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as error:  # noqa: BLE001 - Ray wraps the worker's error; say it without secrets
        raise TrainingError(redact(f"training failed: {_worker_reason(error)}", secrets)) from None
    if getattr(result, "error", None) is not None:
        raise TrainingError(redact(f"training failed: {_worker_reason(result.error)}", secrets)) from None
    if result.checkpoint is None:
        raise TrainingError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        final = safe_load(os.path.join(folder, CHECKPOINT_FILE))
    model_url = join(settings.output.rstrip("/"), MODEL_FILE)
    export_model(final, model_url, settings.export_dtype, options)
    metrics = dict(final["metrics"][-1]) if final.get("metrics") else {}
    say(f"maskray train: done in {time.perf_counter() - started:.0f} s; model written to {public_url(model_url)}")
    return {"metrics": metrics, "model": model_url, "epoch": final["epoch"], "step": final["step"]}
