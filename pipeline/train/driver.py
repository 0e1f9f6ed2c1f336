"""Training Mask R-CNN with Ray Train: COCO data at any fsspec URL in, checkpoints and a model out.

The driver (``train``) checks the data and the output, builds the model's config, and runs a
``TorchTrainer`` whose workers each hold a replica of the very model the segmentation job runs
(DDP: gloo on CPUs, NCCL on GPUs), each running ``maskray.pipeline.train.loop.train_worker``.
The files a run writes are listed in ``maskray.pipeline.train.settings``.

Resuming: Ray Train keeps a record of the reported checkpoints in ``OUTPUT/checkpoints``
(``checkpoint_manager_snapshot.json``), written after each checkpoint's upload has finished;
``resume=True`` continues from the latest recorded one (the step count, schedule and data order
go on where they were). A run killed mid-epoch goes on from the last finished epoch, and a
checkpoint folder that a kill cut short is never loaded, since it was never recorded (the
resumed run writes it again). Starting without ``resume`` on an output that holds a run is an
error, so a run is never overwritten or continued by accident.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from maskray.model import MaskRCNN
from maskray.model.checkpoint import safe_load
from maskray.pipeline.cluster import connect_ray
from maskray.pipeline.errors import Interrupted, MaskrayError, TrainingError
from maskray.pipeline.storage import (
    check_output_is_ours,
    join,
    list_files,
    open_url,
    public_url,
    read_bytes,
    redact,
    remove_temporary_files,
    secret_values,
    write_bytes_atomically,
)
from maskray.pipeline.train.export import export_model
from maskray.pipeline.train.initial_weights import initial_state, load_initial_weights, model_config
from maskray.pipeline.train.loop import check_checkpoint_is_whole, train_worker
from maskray.pipeline.train.metrics import METRICS_CSV, METRICS_PNG
from maskray.pipeline.train.settings import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    RUN_NAME,
    SETTINGS_FILE,
    SNAPSHOT_FILE,
    TrainSettings,
)
from maskray.pipeline.weights import read_weights

# What a run's output holds at its top once settings.json, written first, is there: nothing
# else may be there (storage.check_output_is_ours).
OUTPUT_NAMES = (RUN_NAME, SETTINGS_FILE, METRICS_CSV, METRICS_PNG, MODEL_FILE)


def _storage_for_ray(output: str, storage_options: Mapping[str, Any]):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: local paths as they are,
    anything else through a pyarrow wrapper of the fsspec filesystem (with its options)."""
    from maskray.pipeline.storage import is_local

    fs, path = open_url(output, storage_options)
    if is_local(fs):
        return os.path.abspath(path), None
    import pyarrow.fs

    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_exists(output: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``output`` holds a Ray Train run with a reported checkpoint."""
    fs, root = open_url(output, storage_options)
    names = list_files(fs, join(root, RUN_NAME), recursive=True)
    return any(p.rsplit("/", 1)[-1].startswith("checkpoint_manager_snapshot") for p in names)


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
        record = json.loads(read_bytes(fs, path))
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
    """Our own error that a worker raised (a damaged checkpoint, a loss gone NaN, storage that
    refused, bad COCO data: any MaskrayError), whole and without the traceback snippet Ray cuts
    it into; else Ray's error as it is."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        for _ in range(8):  # through Ray's wrappers (RayTaskError.cause) and chained exceptions
            if cause is None:
                break
            # A RayTaskError is also an instance of its cause's class, with Ray's traceback as its
            # message: go on to the cause it wraps before asking whether the error is ours.
            wrapped = getattr(cause, "cause", None)
            if wrapped is None and isinstance(cause, MaskrayError):
                return f"worker {rank}: {cause}"
            cause = wrapped or cause.__cause__
    return error


def _fit_interruptibly(trainer):
    """``trainer.fit()``, with Ctrl-C raised here as KeyboardInterrupt.

    In the main thread, Ray Train takes SIGINT over: it asks its controller to abort and, when a
    Ctrl-C has reached the controller too (the terminal signals the whole process group), calls
    sys.exit, and the run ends with status 1 and no word. From another thread it leaves SIGINT
    alone (as under Ray Tune). Leaving without waiting for the workers is safe: a checkpoint is
    only recorded once whole, so a resume starts from the last recorded one (tests/test_train.py)."""
    import threading

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="maskray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _interrupted(settings: TrainSettings) -> str:
    """What a Ctrl-C leaves: the checkpoints recorded so far, and how to go on."""
    where = public_url(settings.output)
    try:
        latest = recorded_checkpoint(settings.output, settings.storage_options)
    except (MaskrayError, OSError):  # storage failing too: say what can be said
        latest = None
    if latest is None:
        return f"stopped before the first checkpoint of the run in {where}; the same command starts it again"
    return f"the run in {where} keeps its checkpoints up to {latest}; the same command with --resume goes on from there"


def train(settings: TrainSettings, address: str | None = None, log=print) -> dict[str, Any]:
    """Runs the training job; returns the last epoch's metrics and where the model went."""
    from maskray.pipeline.storage import check_reachable
    from maskray.pipeline.train.coco import CocoDataset

    options = settings.storage_options
    secrets = secret_values(options)

    def say(text: str) -> None:
        log(redact(text, secrets))

    fs, out_root = open_url(settings.output, options)
    check_reachable(settings.output, fs, out_root, must_exist=False)
    check_output_is_ours(settings.output, fs, out_root, "a training run", SETTINGS_FILE, OUTPUT_NAMES)
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
        if latest:
            check_checkpoint_is_whole(fs, join(out_root, RUN_NAME, latest, CHECKPOINT_FILE),
                                      public_url(join(settings.output.rstrip("/"), RUN_NAME, latest, CHECKPOINT_FILE)))
        say(f"maskray train: resuming the run in {public_url(settings.output)} from {latest or 'its start'}")
    elif settings.resume:
        say(f"maskray train: nothing to resume in {public_url(settings.output)}; starting afresh")

    init_config, init_state_dict = None, None
    if settings.init:
        init_config, init_state_dict = initial_state(read_weights(settings.init, options, flag="--init"))
    config = model_config(settings, train_set.class_names, init_config)
    if init_state_dict is not None:
        remade = load_initial_weights(MaskRCNN(config), init_state_dict)  # fails here, not on every worker
        say(f"maskray train: weights from {public_url(settings.init)}"
            + (f"; heads re-made for {config.num_classes} classes: {remade}" if remade else ""))

    # Of the atomic writes (metrics, settings) of a run killed mid-write.
    remove_temporary_files(fs, out_root)
    record = {"settings": settings.public(), "config": config.to_dict()}
    write_bytes_atomically(fs, join(out_root, SETTINGS_FILE), json.dumps(record, indent=1).encode())

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
        f"{settings.epochs} epochs of batch {settings.batch_size} per worker, lr {settings.base_lr:g}"
        + (" (the linear scaling rule)" if settings.lr is None else "") + f", output {public_url(settings.output)}")
    started = time.perf_counter()
    try:
        result = _fit_interruptibly(trainer)
    except KeyboardInterrupt:
        raise Interrupted(redact(_interrupted(settings), secrets)) from None
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
