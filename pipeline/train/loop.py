"""The per-worker training loop that Ray Train's TorchTrainer runs on every worker (DDP).

Each worker reads its shard of the images through the shared decode path
(``maskray.pipeline.train.coco``), and per epoch:

    SGD steps (warm-up, then step or cosine decay; optional clipping; AMP on GPUs)
    -> losses averaged over workers -> validation AP (each worker a shard, COCOeval on rank 0)
    -> checkpoint via ``ray.train.report`` -> metrics.csv and metrics.png
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

from maskray.model import LOSS_NAMES, MaskRCNN, MaskRCNNConfig
from maskray.model.checkpoint import float32_state_dict, safe_load
from maskray.pipeline.storage import redact, secret_values
from maskray.pipeline.train.initial_weights import load_initial_weights
from maskray.pipeline.train.metrics import write_metrics
from maskray.pipeline.train.schedule import make_optimizer
from maskray.pipeline.train.settings import CHECKPOINT_FILE, TrainingError, TrainSettings


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

    from maskray.pipeline.train.coco import CocoDataset, RandomHorizontalFlip, collate, read_coco_json
    from maskray.pipeline.train.evaluation import coco_evaluate

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

