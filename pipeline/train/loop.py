"""The per-worker training loop that Ray Train's TorchTrainer runs on every worker (DDP).

Each worker reads its shard of the images through the shared decode path
(``maskray.pipeline.train.coco``), and per epoch:

    SGD steps (warm-up, then step or cosine decay; optional clipping; AMP on GPUs)
    -> losses averaged over workers -> validation AP (each worker a shard, COCOeval on rank 0)
    -> checkpoint via ``ray.train.report`` -> metrics.csv and metrics.png
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from maskray.model import LOSS_NAMES, MaskRCNN, MaskRCNNConfig, precision
from maskray.model.checkpoint import float32_state_dict, safe_load
from maskray.pipeline.errors import TrainingError
from maskray.pipeline.storage import redact, secret_values
from maskray.pipeline.train.initial_weights import load_initial_weights
from maskray.pipeline.train.metrics import write_metrics
from maskray.pipeline.train.schedule import make_optimizer
from maskray.pipeline.train.settings import CHECKPOINT_FILE, TrainSettings


def _progress(total: int, description: str, enabled: bool):
    """A progress bar that Ray draws on the driver's console (tqdm_ray), or none."""
    if not enabled:
        return None
    try:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=description)
    except Exception:  # noqa: BLE001 - a progress bar is never worth failing a run for
        return None


# A loss this many times its first step's has diverged. Waiting for it to overflow costs epochs:
# at too high a learning rate the loss climbed to 1e29 before it became NaN.
DIVERGED_FACTOR = 100.0


class DivergenceCheck:
    """Stops a run whose loss is NaN or infinite, or has grown ``DIVERGED_FACTOR`` times its
    first step's (of this run, or of this resume) within a few steps, with what to do about it."""

    def __init__(self) -> None:
        self.first: float | None = None

    def check(self, loss: float, losses: Mapping[str, float], step: int, epoch: int) -> None:
        if self.first is None and math.isfinite(loss):
            self.first = loss
        diverged = self.first is not None and loss > DIVERGED_FACTOR * max(self.first, 1e-3)
        if math.isfinite(loss) and not diverged:
            return
        grown = f", {loss / self.first:.3g} times the first step's {self.first:.3g}" if diverged else ""
        parts = {k: float(f"{v:.4g}") for k, v in losses.items()}
        raise TrainingError(f"the loss is {loss:.4g} at step {step} (epoch {epoch + 1}){grown}: {parts}; "
                            "lower --lr or set --clip-grad-norm")


def _move_targets(targets: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def average_batchnorm_statistics(model: torch.nn.Module, world: int) -> None:
    """Every worker's running BatchNorm statistics replaced by their mean over the workers.

    Each replica updates its running averages from its own batches; without this, the workers
    would validate with different statistics, and the checkpoint (rank 0's) would differ from
    what was validated.
    """
    from maskray.model.resnet import BatchNorm2d

    for module in model.modules():
        if isinstance(module, BatchNorm2d):
            for buffer in (module.running_mean, module.running_var):
                torch.distributed.all_reduce(buffer)
                buffer.div_(world)


def _evaluate_shard(model: MaskRCNN, dataset, rank: int, world: int, device: torch.device,
                    batch_size: int) -> list[dict] | None:
    """Every worker predicts its share of the validation images; rank 0 gets all results."""
    from maskray.pipeline.train.evaluation import predict_coco_results

    indices = list(range(rank, len(dataset), world))
    results = predict_coco_results(model, dataset, indices, batch_size=batch_size, device=device)
    if world == 1:
        return results
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    return [r for part in gathered for r in part] if rank == 0 else None


RESUME_KEYS = ("config", "optimizer", "scheduler", "epoch", "step")


def _cannot_resume(where: str, reason: object) -> TrainingError:
    return TrainingError(f"cannot resume from the checkpoint {where}: {reason}. Start a new run (another "
                         f"--output) with --init set to an earlier epoch's {CHECKPOINT_FILE}")


def check_checkpoint_is_whole(fs, path: str, where: str) -> None:
    """Fails fast, in the driver before any worker starts, on a checkpoint file cut short: a
    torch.save file is a zip archive, and one cut short has no central directory. Reading that
    directory takes a few small reads at the end of the file, not a download of it; damage
    further in is left to ``read_resume_state`` on the workers."""
    try:
        with fs.open(path, "rb") as file, zipfile.ZipFile(file):
            pass
    except (zipfile.BadZipFile, EOFError) as error:
        raise _cannot_resume(where, f"the file is cut short or damaged ({error})") from None
    except FileNotFoundError:
        raise _cannot_resume(where, "the file is missing") from None


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
            raise _cannot_resume(where, error) from None
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise _cannot_resume(where, f"it lacks {missing} (not a training checkpoint)")
    return state


@dataclass
class EpochTotals:
    """An epoch's running totals: of this worker while it trains, of every worker once reduced."""

    losses: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_NAMES, 0.0))  # summed over steps
    images: int = 0
    skipped_annotations: int = 0  # annotations the data loader left out (too small to train on)
    steps: int = 0

    def add_step(self, losses: Mapping[str, torch.Tensor], images: int) -> None:
        for name in LOSS_NAMES:
            self.losses[name] += losses[name].item()
        self.images += images
        self.steps += 1

    def mean_losses(self) -> dict[str, float]:
        """Each loss averaged over the steps, in LOSS_NAMES order."""
        return {name: self.losses[name] / max(self.steps, 1) for name in LOSS_NAMES}

    # One tensor holds every field, so that a single all-reduce sums them all. Float64 keeps
    # the loss sums as exact as Python's floats, and counts exact up to 2**53.
    def pack(self) -> torch.Tensor:
        counts = (self.images, self.skipped_annotations, self.steps)
        return torch.tensor([*(self.losses[name] for name in LOSS_NAMES), *counts], dtype=torch.float64)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> EpochTotals:
        *losses, images, skipped_annotations, steps = packed.tolist()
        return cls(dict(zip(LOSS_NAMES, losses)), int(images), int(skipped_annotations), int(steps))

    def all_reduced(self, device: torch.device) -> EpochTotals:
        """The totals summed over every worker (a collective: every worker must call it)."""
        packed = self.pack().to(device)  # NCCL reduces only GPU tensors
        torch.distributed.all_reduce(packed)
        return EpochTotals.unpack(packed.cpu())


@dataclass
class WorkerData:
    """This worker's share of the training images, and the validation set (its truth on rank 0)."""

    sampler: Any  # a DistributedSampler: set_epoch reshuffles
    loader: Any
    val_set: Any = None
    val_truth: dict | None = None


def build_data(settings: TrainSettings, rank: int, world: int) -> WorkerData:
    from torch.utils.data import DataLoader, DistributedSampler

    from maskray.pipeline.train.coco import CocoDataset, RandomHorizontalFlip, collate, read_coco_json

    options = settings.storage_options
    dataset = CocoDataset(settings.train_json, settings.train_images, options, check_files=False)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed)
    loader = DataLoader(RandomHorizontalFlip(dataset), batch_size=settings.batch_size, sampler=sampler,
                        collate_fn=collate, num_workers=settings.loader_workers,
                        persistent_workers=settings.loader_workers > 0)
    data = WorkerData(sampler, loader)
    if settings.val_json:
        data.val_set = CocoDataset(settings.val_json, settings.val_images, options, check_files=False)
        data.val_truth = read_coco_json(settings.val_json, options) if rank == 0 else None
    return data


def build_training_model(loop_config: dict[str, Any], state: dict[str, Any] | None) -> MaskRCNN:
    """The model of a resumed run with its weights, or a new one (with the --init weights if any)."""
    if state is not None:
        model = MaskRCNN(MaskRCNNConfig.from_dict(state["config"]))  # the run's model, whatever the options now
        model.load_state_dict(float32_state_dict(state))
        return model
    model = MaskRCNN(MaskRCNNConfig.from_dict(loop_config["config"]))
    if loop_config.get("init_state_dict") is not None:
        load_initial_weights(model, loop_config["init_state_dict"])
    return model


class WorkerTraining:
    """One worker's model, optimiser, schedule and AMP scaler, with the step count and the
    metrics rows of the run; started afresh or from the checkpoint ``state`` of a resume."""

    def __init__(self, settings: TrainSettings, model: MaskRCNN, rank: int, world: int, device: torch.device,
                 steps_per_epoch: int, state: dict[str, Any] | None) -> None:
        import ray.train.torch

        self.settings, self.rank, self.world, self.device = settings, rank, world, device
        self.model = model.to(device)
        self.ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
        self.steps_per_epoch = steps_per_epoch
        self.parameters, self.optimizer, self.scheduler = make_optimizer(model, settings, steps_per_epoch)
        self.precision = precision.resolve_for_training("fp32" if settings.amp is False else settings.precision, device)
        # float16's narrow range needs the loss scaled; bfloat16 has float32's.
        self.use_amp = self.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp)
        self.start_epoch, self.step, self.history = 0, 0, []
        self.divergence = DivergenceCheck()
        if state is not None:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state.get("metrics", []))
        if self.rank == 0:
            print(f"maskray train: resuming after epoch {self.start_epoch} (step {self.step})", flush=True)

    def train_step(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                   epoch: int) -> dict[str, torch.Tensor]:
        """One SGD step on a batch; returns its losses. A loss gone NaN, infinite or
        ``DIVERGED_FACTOR`` times its first step's stops the run."""
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = _move_targets(targets, self.device)
        with precision.autocast(self.precision, self.device):
            losses = self.ddp_model(images, targets)
        loss = sum(losses.values())
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))  # one sync
        self.divergence.check(sum(values.values()), values, self.step, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return losses

    def train_epoch(self, data: WorkerData, epoch: int) -> tuple[EpochTotals, float]:
        """An epoch over this worker's shard: its totals and the seconds it took."""
        data.sampler.set_epoch(epoch)
        self.model.train()
        totals = EpochTotals()
        show = self.settings.progress and self.rank == 0
        bar = _progress(self.steps_per_epoch, f"epoch {epoch + 1}/{self.settings.epochs}", show)
        started = time.perf_counter()
        for images, targets in data.loader:
            # The loader's count rides in the targets; taken out before they go to the model.
            totals.skipped_annotations += sum(int(t.pop("skipped")) for t in targets)
            losses = self.train_step(images, targets, epoch)
            totals.add_step(losses, len(images))
            if bar is not None:
                bar.update(1)
        seconds = time.perf_counter() - started
        if bar is not None:
            bar.close()
        return totals, seconds

    def epoch_row(self, epoch: int, totals: EpochTotals, seconds: float) -> dict[str, Any]:
        """The epoch's metrics row (what metrics.csv and the checkpoint hold) from every worker's totals."""
        means = totals.mean_losses()
        return {
            "epoch": epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
            "loss": sum(means.values()), **means,
            "images_per_s": totals.images / seconds, "epoch_seconds": seconds,
            "skipped_annotations": totals.skipped_annotations,
        }

    def validate(self, data: WorkerData) -> dict[str, float]:
        """Validation AP (bbox and segm) on rank 0, an empty dict elsewhere; every worker predicts a shard."""
        from maskray.pipeline.train.evaluation import coco_evaluate

        results = _evaluate_shard(self.model, data.val_set, self.rank, self.world, self.device,
                                  self.settings.batch_size)
        if self.rank != 0:
            return {}
        ap = coco_evaluate(data.val_truth, results)
        return {k: ap[k] for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")}

    def report(self, epoch: int, row: dict[str, Any]) -> None:
        """The epoch to Ray Train: rank 0 with the checkpoint, then metrics.csv/png and a log line."""
        import ray.train

        name = f"epoch-{epoch + 1:04d}"
        if self.rank != 0:
            ray.train.report(row, checkpoint=None, checkpoint_dir_name=name)
            return
        settings = self.settings
        with tempfile.TemporaryDirectory() as folder:
            self.model.save(os.path.join(folder, CHECKPOINT_FILE), optimizer=self.optimizer.state_dict(),
                            scheduler=self.scheduler.state_dict(),
                            scaler=self.scaler.state_dict() if self.use_amp else None,
                            epoch=epoch + 1, step=self.step, metrics=self.history, settings=settings.public())
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        write_metrics(self.history, settings.output, settings.storage_options)
        summary = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(redact(f"maskray train: {summary}", secret_values(settings.storage_options)), flush=True)


class _SaidByTheDriver(logging.Filter):
    """Drops Ray Train's log of a worker's error when the error is one of ours (a loss gone NaN,
    bad data, storage that refused): the driver says it in one line, and Ray's copy of it is a
    traceback on the user's console. Any other error, a bug, keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Error in training function"):
            return True
        last = text.rstrip().rsplit("\n", 1)[-1]
        return not last.startswith("maskray.")


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker training loop that TorchTrainer runs on every worker."""
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train.v2._internal.util").addFilter(_SaidByTheDriver())  # where Ray logs it
    settings = TrainSettings(**loop_config["settings"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if settings.cpus_per_worker:
        torch.set_num_threads(settings.cpus_per_worker)
    device = ray.train.torch.get_device()
    torch.manual_seed(settings.seed + rank)  # flips differ per worker; DDP gives all rank 0's weights

    data = build_data(settings, rank, world)
    resumed = ray.train.get_checkpoint()
    state = read_resume_state(resumed) if resumed is not None else None
    model = build_training_model(loop_config, state)
    training = WorkerTraining(settings, model, rank, world, device, len(data.loader), state)

    for epoch in range(training.start_epoch, settings.epochs):
        totals, seconds = training.train_epoch(data, epoch)
        if world > 1:
            totals = totals.all_reduced(device)
            average_batchnorm_statistics(training.model, world)
        row = training.epoch_row(epoch, totals, seconds)
        if data.val_set is not None:
            row.update(training.validate(data))
        training.history.append(row)
        training.report(epoch, row)
