"""Training with Ray Train (pipeline/train/, maskray train).

The main test runs the job as users do, two workers (DDP over gloo) on the CPU on a small
shapes set: it is killed with SIGKILL in the middle of an epoch, after a checkpoint; a torn
checkpoint folder (what a kill during an upload leaves) must not be what the resume loads, and
a damaged recorded one must stop the resume with an error naming it. Resumed, it must go on
from the last checkpoint (epochs and steps counting on from it) and then have learned
(loss down by a clear margin, AP above an untrained model's on the same images, COCOeval
computing both). The parts (schedule, starting weights, export) are checked against
torch's and torchvision's own.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.model.checkpoint import safe_load
from maskray.pipeline.errors import StorageError, StorageWriteError, TrainingError
from maskray.pipeline.train.coco import CocoDataError, CocoDataset
from maskray.pipeline.train.driver import _worker_reason, recorded_checkpoint, train
from maskray.pipeline.train.evaluation import coco_evaluate, predict_coco_results
from maskray.pipeline.train.export import export_model
from maskray.pipeline.train.initial_weights import load_initial_weights, model_config
from maskray.pipeline.train.schedule import lr_factor, steps_at_epochs
from maskray.pipeline.train.settings import CHECKPOINT_FILE, RUN_NAME, SETTINGS_FILE, SNAPSHOT_FILE, TrainSettings
from maskray.pipeline.train.shapes import write_shapes

REPO = Path(__file__).resolve().parents[1]
# A small, quick model: the light preset, narrower, on 96-pixel images.
TINY = {"min_size": [96], "max_size": 96, "representation_size": 128, "fpn_channels": 64, "mask_head_channels": 64,
        "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 150, "rpn_pre_nms_top_n_test": 150,
        "rpn_post_nms_top_n_test": 60, "box_batch_size_per_image": 64}


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """24 shapes images with one category, "shape": a task a model learns in a few dozen steps
    from scratch (telling the five kinds apart takes longer than a test may)."""
    root = tmp_path_factory.mktemp("train-shapes")
    write_shapes(str(root), 24, seed=8, size=(96, 96))
    data = json.loads((root / "annotations.json").read_text())
    data["categories"] = [{"id": 1, "name": "shape", "supercategory": "shape"}]
    for annotation in data["annotations"]:
        annotation["category_id"] = 1
    (root / "annotations.json").write_text(json.dumps(data))
    return root


def tiny_args(shapes: Path, output: str, *extra: str) -> list[str]:
    args = ["--train-json", str(shapes / "annotations.json"), "--train-images", str(shapes / "images"),
            "--val-json", str(shapes / "annotations.json"), "--val-images", str(shapes / "images"),
            "--output", output, "--workers", "2", "--cpus-per-worker", "1", "--batch-size", "2",
            "--lr", "0.02", "--warmup-iters", "4", "--schedule", "cosine", "--clip-grad-norm", "5", "--no-progress"]
    for key, value in TINY.items():
        args += ["--model-option", f"{key}={json.dumps(value)}"]
    return args + list(extra)


def parse(args: list[str]) -> argparse.Namespace:
    from maskray.jobs import train as train_job

    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    return parser.parse_args(args)


def settings_of(args: list[str]) -> TrainSettings:
    ns = parse(args)
    return TrainSettings(
        train_json=ns.train_json, train_images=ns.train_images, output=ns.output, val_json=ns.val_json,
        val_images=ns.val_images, workers=ns.workers, cpus_per_worker=ns.cpus_per_worker, epochs=ns.epochs,
        batch_size=ns.batch_size, lr=ns.lr, warmup_iters=ns.warmup_iters, schedule=ns.schedule,
        model_options=dict(ns.model_option), progress=False, resume=ns.resume, storage_options=ns.storage_options,
        export_dtype=ns.export_dtype,
    )


def snapshot_records(run: Path) -> list[dict]:
    """The checkpoints Ray Train has recorded for the run (what a resume starts from), each with
    its metrics, read from Ray's own record."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    try:
        return json.loads(snapshot.read_text())["checkpoint_results"]
    except json.JSONDecodeError:  # being written
        return []


def snapshot_checkpoints(run: Path) -> list[str]:
    return [r["checkpoint_dir_name"] for r in snapshot_records(run)]


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL to the job and every process of its session (its own Ray included)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.getsid(pid) == process.pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# -----------------------------------------------------------------------------------------------
# The job, end to end


@pytest.mark.slow
def test_two_workers_learn_and_a_run_killed_mid_epoch_resumes(tiny_shapes, tmp_path, ray_local):
    output = tmp_path / "run"
    epochs = 12
    # 1. The job as users start it, in its own process (and its own local Ray), killed with
    #    SIGKILL in the middle of an epoch: once Ray Train has recorded a checkpoint, half an
    #    epoch later (the next epoch's steps take about as long as the last one's did).
    script = ("import sys; from maskray.jobs import train; import argparse; p = argparse.ArgumentParser(); "
              "train.add_arguments(p); sys.exit(train.run(p.parse_args(sys.argv[1:])))")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-c", script, *tiny_args(tiny_shapes, str(output), "--epochs", str(epochs))],
                               cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not snapshot_checkpoints(output / RUN_NAME):
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.1)
        mid_epoch = time.monotonic() + snapshot_records(output / RUN_NAME)[-1]["metrics"]["epoch_seconds"] / 2
        while time.monotonic() < mid_epoch:
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            time.sleep(0.05)
    finally:
        kill_session(process)
    recorded = snapshot_checkpoints(output / RUN_NAME)
    done = len(recorded)
    assert recorded == [f"epoch-{e:04d}" for e in range(1, done + 1)] and done < epochs
    killed_at = safe_load(output / RUN_NAME / recorded[-1] / CHECKPOINT_FILE)
    assert killed_at["epoch"] == done
    assert not (output / "model.pt").exists()

    # What a kill during the next checkpoint's upload leaves: its folder with half a file, which
    # Ray never recorded. The resume must not load it (a loader picking the newest folder would).
    torn = output / RUN_NAME / f"epoch-{done + 1:04d}" / CHECKPOINT_FILE
    torn.parent.mkdir(exist_ok=True)
    whole = (output / RUN_NAME / recorded[-1] / CHECKPOINT_FILE).read_bytes()
    torn.write_bytes(whole[: len(whole) // 2])
    assert recorded_checkpoint(str(output)) == recorded[-1]

    # A recorded checkpoint that is cut short all the same (in a copy of the run) stops the resume
    # with an error naming it, rather than a silent start from scratch, and before any worker.
    broken = tmp_path / "broken"
    shutil.copytree(output, broken)
    (broken / RUN_NAME / recorded[-1] / CHECKPOINT_FILE).write_bytes(whole[: len(whole) // 3])
    said = []
    with pytest.raises(TrainingError, match=f"cannot resume from the checkpoint .*{recorded[-1]}/{CHECKPOINT_FILE}: "
                                            "the file is cut short"):
        train(settings_of(tiny_args(tiny_shapes, str(broken), "--epochs", str(epochs), "--resume", "--workers", "1")),
              log=said.append)
    assert said and not any("worker(s) x" in line for line in said), said  # the line said as the workers start

    # 2. Started again without --resume, the job refuses to touch the run.
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(settings_of(tiny_args(tiny_shapes, str(output), "--epochs", str(epochs))), log=lambda _: None)

    # 3. Resumed, here on the test's Ray: it continues from that checkpoint to the end.
    outcome = train(settings_of(tiny_args(tiny_shapes, str(output), "--epochs", str(epochs), "--resume")), log=lambda _: None)
    final = safe_load(output / RUN_NAME / f"epoch-{epochs:04d}" / CHECKPOINT_FILE)
    history = final["metrics"]
    steps_per_epoch = killed_at["step"] // done
    assert steps_per_epoch == 24 // (2 * 2)  # 24 images over 2 workers x 2 images
    # The epochs before the kill are the killed run's own rows (timings included), not redone...
    assert history[:done] == killed_at["metrics"]
    # ... and the step count goes on from the checkpoint's.
    assert [row["step"] for row in history] == [steps_per_epoch * (e + 1) for e in range(epochs)]
    assert final["step"] == outcome["step"] == epochs * steps_per_epoch
    assert final["scheduler"]["last_epoch"] == final["step"]

    # The torn folder was written again, whole, by the resumed run's epoch.
    assert safe_load(torn)["epoch"] == done + 1 and safe_load(torn)["metrics"] == history[: done + 1]

    # Checkpoints of every epoch, metrics as CSV and PNG, and the exported model.
    assert sorted(p.name for p in (output / RUN_NAME).glob("epoch-*")) == [f"epoch-{e:04d}" for e in range(1, epochs + 1)]
    with open(output / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "lr",
            "images_per_s", "segm_AP", "bbox_AP"} <= set(rows[0])
    assert (output / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # It learned: the loss fell by a clear margin...
    assert float(rows[-1]["loss"]) < 0.7 * float(rows[0]["loss"]), [r["loss"] for r in rows]
    # ... and the exported model finds the shapes better than an untrained one does (COCOeval on
    # the same images, computed here from the model file, not taken from the job's own log).
    dataset = CocoDataset(str(tiny_shapes / "annotations.json"), str(tiny_shapes / "images"))
    truth = json.loads((tiny_shapes / "annotations.json").read_text())
    trained = MaskRCNN.load(output / "model.pt")
    torch.manual_seed(0)
    untrained = MaskRCNN(trained.config).eval()
    trained_ap = coco_evaluate(truth, predict_coco_results(trained, dataset))
    untrained_ap = coco_evaluate(truth, predict_coco_results(untrained, dataset))
    assert trained_ap["bbox_AP"] > untrained_ap["bbox_AP"] + 0.05, (trained_ap["bbox_AP"], untrained_ap["bbox_AP"])
    assert trained_ap["segm_AP"] > untrained_ap["segm_AP"] + 0.05, (trained_ap["segm_AP"], untrained_ap["segm_AP"])
    assert float(rows[-1]["segm_AP"]) == pytest.approx(trained_ap["segm_AP"], abs=1e-6)


def test_a_checkpoint_damaged_past_the_drivers_check_stops_the_worker_with_its_name(tmp_path):
    """A whole zip that is no training checkpoint passes the driver's quick look at the file's end;
    the worker, which loads it, names it (here on Ray Train's own Checkpoint, without a trainer)."""
    import ray.train
    from fsspec.implementations.local import LocalFileSystem

    from maskray.pipeline.train.loop import check_checkpoint_is_whole, read_resume_state

    folder = tmp_path / "epoch-0003"
    folder.mkdir()
    with pytest.raises(TrainingError, match="cannot resume from the checkpoint here: the file is missing"):
        check_checkpoint_is_whole(LocalFileSystem(), str(folder / CHECKPOINT_FILE), "here")
    with zipfile.ZipFile(folder / CHECKPOINT_FILE, "w") as archive:
        archive.writestr("notes.txt", "not a torch.save file")
    check_checkpoint_is_whole(LocalFileSystem(), str(folder / CHECKPOINT_FILE), "here")  # the driver lets it pass
    with pytest.raises(TrainingError, match=f"cannot resume from the checkpoint .*epoch-0003/{CHECKPOINT_FILE}: .*not a "
                                            "loadable weights file"):
        read_resume_state(ray.train.Checkpoint.from_directory(str(folder)))
    torch.save({"model": {}, "epoch": 3}, folder / CHECKPOINT_FILE)
    with pytest.raises(TrainingError, match=r"it lacks \['config', 'optimizer', 'scheduler', 'step'\]"):
        read_resume_state(ray.train.Checkpoint.from_directory(str(folder)))


def test_a_torn_run_record_is_a_clear_error(tiny_shapes, tmp_path):
    """Ray Train's record of the checkpoints, cut short (a kill while it was written): resuming
    says which file and what to do, before any worker starts."""
    output = tmp_path / "run"
    (output / RUN_NAME / "epoch-0001").mkdir(parents=True)
    (output / RUN_NAME / SNAPSHOT_FILE).write_text('{"checkpoint_results": [{"checkpoint_dir_name": "epo')
    (output / SETTINGS_FILE).write_text("{}")  # what a run writes first
    with pytest.raises(TrainingError, match=f"{SNAPSHOT_FILE}: Ray Train's record .* cannot be read .*--init"):
        train(settings_of(tiny_args(tiny_shapes, str(output), "--resume")), log=lambda _: None)


@pytest.mark.slow
def test_data_and_output_in_a_bucket(tmp_path, s3, ray_local):
    write_shapes(s3.url("data"), 4, seed=3, size=(64, 64), storage_options=s3.storage_options)
    args = ["--train-json", s3.url("data", "annotations.json"), "--train-images", s3.url("data", "images"),
            "--output", s3.url("out"), "--workers", "1", "--cpus-per-worker", "1", "--epochs", "1", "--batch-size", "2",
            "--warmup-iters", "1", "--no-progress", "--export-dtype", "float16",
            "--storage-options", json.dumps(s3.storage_options)]
    for key, value in {**TINY, "min_size": [64], "max_size": 64}.items():
        args += ["--model-option", f"{key}={json.dumps(value)}"]
    outcome = train(settings_of(args), log=lambda _: None)
    fs = s3.filesystem()
    names = fs.find(s3.name)
    assert f"{s3.name}/out/{RUN_NAME}/epoch-0001/{CHECKPOINT_FILE}" in names
    assert {f"{s3.name}/out/model.pt", f"{s3.name}/out/metrics.csv", f"{s3.name}/out/metrics.png"} <= set(names)
    # No credential in anything the job wrote.
    for name in names:
        content = fs.cat(name)
        for secret in (s3.storage_options["key"], s3.storage_options["secret"]):
            assert secret.encode() not in content, name
    model = MaskRCNN.load(fs.open(f"{s3.name}/out/model.pt", "rb"))
    assert model.class_names[1:] == ("circle", "square", "triangle", "star", "hexagon")
    assert outcome["epoch"] == 1


# -----------------------------------------------------------------------------------------------
# The parts


@pytest.mark.parametrize("warmup", [0, 5])
def test_step_schedule_is_torchs_warmup_then_multistep(warmup):
    total, milestones, gamma, factor = 40, steps_at_epochs((4, 7), 5), 0.1, 1e-3
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma)]
    if warmup:
        schedulers.insert(0, torch.optim.lr_scheduler.LinearLR(optimizer, factor, 1.0, total_iters=warmup))
    chained = torch.optim.lr_scheduler.ChainedScheduler(schedulers)
    for step in range(total):
        ours = 0.5 * lr_factor(step, total, warmup, factor, "step", milestones, gamma)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(ours, rel=1e-9), step
        optimizer.step()
        chained.step()


def test_cosine_schedule_is_torchs_cosine_annealing():
    total = 30
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    for step in range(total + 1):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(step, total, 0, 1.0, "cosine", [], 0.1), abs=1e-12)
        optimizer.step()
        cosine.step()


@pytest.mark.parametrize("builder, norm", [("maskrcnn_resnet50_fpn", "frozen"), ("maskrcnn_resnet50_fpn_v2", "batch")])
def test_torchvision_weights_start_a_model_of_other_classes(builder, norm):
    import torchvision

    from maskray.model.checkpoint import torchvision_config

    torch.manual_seed(0)
    theirs = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=91)
    state_dict = theirs.state_dict()
    settings = TrainSettings(train_json="x", train_images="y", output="z")
    config = model_config(settings, ("__background__", "a", "b"), torchvision_config(state_dict))
    assert config.backbone == "resnet50" and config.backbone_norm == norm and config.num_classes == 3
    # v2's trunk as torchvision trains it from COCO weights: BatchNorm, three stages trainable.
    assert config.trainable_backbone_layers == 3 and config.class_names == ("__background__", "a", "b")
    assert (config.box_head_convs, config.rpn_head_convs) == ((4, 2) if norm == "batch" else (0, 1))
    model = MaskRCNN(config)
    remade = load_initial_weights(model, state_dict)
    assert remade == ["roi_heads.box_predictor.bbox_pred", "roi_heads.box_predictor.cls_score",
                      "roi_heads.mask_predictor.mask_fcn_logits"]
    ours = model.state_dict()
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") and norm == "frozen":  # torchvision's frozen BatchNorm keeps none
            assert key not in ours
        elif key.startswith(tuple(remade)):
            assert ours[key].shape[0] != value.shape[0]
        else:
            assert torch.equal(ours[key], value), key


def test_our_checkpoint_starts_a_model_of_other_classes(tmp_path):
    torch.manual_seed(0)
    source = MaskRCNN(MaskRCNNConfig.light(4, **{k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}))
    source.save(tmp_path / "source.pt", weights_dtype="float16")
    from maskray.pipeline.train.initial_weights import initial_state
    from maskray.pipeline.weights import read_weights

    init_config, state_dict = initial_state(read_weights(str(tmp_path / "source.pt"), flag="--init"))
    settings = TrainSettings(train_json="x", train_images="y", output="z", model_options={"max_size": 128})
    config = model_config(settings, ("__background__", "a", "b", "c", "d", "e"), init_config)
    assert config.fpn_channels == 64 and config.max_size == 128 and config.num_classes == 6
    model = MaskRCNN(config)
    assert len(load_initial_weights(model, state_dict)) == 3
    assert torch.equal(model.state_dict()["backbone.fpn.inner_blocks.0.0.weight"],
                       source.state_dict()["backbone.fpn.inner_blocks.0.0.weight"].half().float())


def test_weights_of_another_architecture_are_refused():
    settings = TrainSettings(train_json="x", train_images="y", output="z")
    config = model_config(settings, ("__background__", "a"), None)
    model = MaskRCNN(config)
    other = MaskRCNN(config.replace(fpn_channels=64)).state_dict()
    with pytest.raises(TrainingError, match="do not fit this model"):
        load_initial_weights(model, other)


def test_from_scratch_trains_batchnorm_and_exports_it_frozen(tmp_path):
    settings = TrainSettings(train_json="x", train_images="y", output="z")
    config = model_config(settings, ("__background__", "a", "b"), None)
    assert config.backbone_norm == "batch" and config.trainable_backbone_layers == 5
    torch.manual_seed(0)
    model = MaskRCNN(config.replace(min_size=(64,), max_size=64)).train()
    # Some batch statistics, so that the running averages are not the identity.
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 10:40] = 1
    targets = [{"boxes": boxes, "labels": torch.tensor([1]), "masks": masks}] * 2
    sum(model(images, targets).values()).backward()
    checkpoint = {"config": model.config.to_dict(), "state_dict": model.state_dict(), "epoch": 1, "step": 1, "metrics": []}
    exported = export_model(checkpoint, str(tmp_path / "model.pt"))
    loaded = MaskRCNN.load(tmp_path / "model.pt")
    assert loaded.config.backbone_norm == "frozen"
    image = torch.rand(3, 64, 64)
    model.eval()
    # The trained BatchNorm in eval mode and the frozen one it became are the same map.
    a, b = model.backbone(model.transform([image])[0]), loaded.backbone(loaded.transform([image])[0])
    for level in a:
        torch.testing.assert_close(a[level], b[level], rtol=1e-4, atol=1e-4)
    assert exported.config == loaded.config


class FakeRayTaskError(Exception):
    """What Ray's RayTaskError looks like to the driver: its traceback as the message, the worker's error as .cause."""

    def __init__(self, cause: BaseException):
        super().__init__(f"ray::_RayTrainWorker__execute.get_next() (pid=1)\n  File \"loop.py\"\n{cause!r}")
        self.cause = cause


class FakeDualRayTaskError(FakeRayTaskError, StorageError):
    """Ray's as_instanceof_cause: a RayTaskError that is an instance of its cause's class too."""


class FakeWorkerGroupError(Exception):
    def __init__(self, worker_failures: dict):
        super().__init__("Training failed due to worker errors:\n[Rank 0]\n...")
        self.worker_failures = worker_failures


@pytest.mark.parametrize("failure, message", [
    (FakeRayTaskError(TrainingError("the loss is NaN at step 3")), "worker 0: the loss is NaN at step 3"),
    (FakeRayTaskError(StorageError("cannot read s3://b/img/1.png: access was refused (3 tries)")),
     "worker 0: cannot read s3://b/img/1.png: access was refused (3 tries)"),
    (FakeRayTaskError(StorageWriteError("cannot write s3://b/run/metrics.csv: throttled")),
     "worker 0: cannot write s3://b/run/metrics.csv: throttled"),
    (FakeRayTaskError(CocoDataError("s3://b/train.json: 'annotations' must be a list")),
     "worker 0: s3://b/train.json: 'annotations' must be a list"),
    (FakeDualRayTaskError(StorageError("s3://b/x: no such bucket")), "worker 0: s3://b/x: no such bucket"),
    (StorageError("s3://b/y: refused"), "worker 0: s3://b/y: refused"),  # Ray Train v2 hands over the error itself
], ids=["TrainingError", "StorageError", "StorageWriteError", "CocoDataError", "dual", "bare"])
def test_a_workers_own_error_reaches_the_user_whole_without_rays_wrapper(failure, message):
    assert _worker_reason(FakeWorkerGroupError({0: failure})) == message


def test_a_workers_other_error_is_rays_as_it_is():
    error = FakeWorkerGroupError({0: FakeRayTaskError(KeyError("a bug"))})
    assert _worker_reason(error) is error


def test_settings_errors_name_the_option():
    with pytest.raises(ValueError, match="workers must be at least 1"):
        TrainSettings(train_json="x", train_images="y", output="z", workers=0)
    with pytest.raises(ValueError, match="both --val-json and --val-images"):
        TrainSettings(train_json="x", train_images="y", output="z", val_json="v")
    settings = TrainSettings(train_json="x", train_images="y", output="z", model_options={"no_such_field": 1})
    with pytest.raises(TrainingError, match="unknown model option"):
        model_config(settings, ("__background__", "a"), None)


def test_bad_training_data_stops_the_job_before_any_worker(tmp_path):
    write_shapes(str(tmp_path / "data"), 2, seed=1, size=(64, 64))
    (tmp_path / "data" / "images" / "000001.png").unlink()
    settings = TrainSettings(train_json=str(tmp_path / "data" / "annotations.json"),
                             train_images=str(tmp_path / "data" / "images"), output=str(tmp_path / "out"))
    from maskray.pipeline.train.coco import CocoDataError

    with pytest.raises(CocoDataError, match="000001.png"):
        train(settings, log=lambda _: None)


# -----------------------------------------------------------------------------------------------
# Training that cannot work says so early


def test_the_default_learning_rate_follows_the_linear_scaling_rule():
    # torchvision's reference recipe: 0.02 for 16 images per step (8 GPUs x 2), scaled to the total batch.
    def base_lr(**options) -> float:
        return TrainSettings(train_json="x", train_images="y", output="z", **options).base_lr

    assert base_lr(workers=8, batch_size=2) == pytest.approx(0.02)
    assert base_lr(workers=1, batch_size=2) == pytest.approx(0.0025)
    assert base_lr(workers=2, batch_size=4) == pytest.approx(0.01)
    assert base_lr(workers=1, batch_size=2, lr=0.3) == 0.3  # given: as it is
    from maskray.pipeline.train.schedule import make_optimizer

    model = torch.nn.Linear(2, 2)
    settings = TrainSettings(train_json="x", train_images="y", output="z", workers=2, batch_size=1, warmup_iters=0)
    _, optimizer, _ = make_optimizer(model, settings, steps_per_epoch=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 2 / 16)


def test_a_loss_that_grows_by_orders_of_magnitude_stops_the_run():
    from maskray.pipeline.train.loop import DivergenceCheck

    check = DivergenceCheck()
    for step, loss in enumerate([4.0, 6.5, 3.1, 40.0, 2.0, 0.4, 0.2, 399.0]):  # ups and downs, all under 100x
        check.check(loss, {"loss_classifier": loss}, step, 0)
    with pytest.raises(TrainingError, match=r"the loss is 1e\+05 at step 8 \(epoch 1\), 2.5e\+04 times the first "
                                            r"step's 4: \{'loss_classifier': 100000.0\}; lower --lr or set --clip"):
        check.check(1e5, {"loss_classifier": 1e5}, 8, 0)
    with pytest.raises(TrainingError, match=r"the loss is nan at step 3 \(epoch 2\): .*lower --lr"):
        DivergenceCheck().check(float("nan"), {"loss_mask": float("nan")}, 3, 1)


@pytest.mark.slow
def test_a_learning_rate_far_too_high_stops_within_a_few_steps(tiny_shapes, tmp_path, ray_local):
    args = tiny_args(tiny_shapes, str(tmp_path / "run"), "--epochs", "3")
    args[args.index("--lr") + 1] = "200"  # and no clipping: it diverges at once
    del args[args.index("--clip-grad-norm"):args.index("--clip-grad-norm") + 2]
    settings = settings_of(args)
    with pytest.raises(TrainingError, match=r"the loss is \S+ at step (\d) \(epoch 1\)") as raised:
        train(dataclasses.replace(settings, workers=1, cpus_per_worker=2), log=lambda _: None)
    assert "lower --lr or set --clip-grad-norm" in str(raised.value)


@pytest.mark.slow
def test_ctrl_c_stops_a_run_in_one_line_that_says_how_to_go_on(tiny_shapes, tmp_path):
    output = tmp_path / "run"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "maskray.jobs.train", *tiny_args(tiny_shapes, str(output), "--epochs", "12")]
    # A shell's foreground job: Ctrl-C signals its whole process group, its local Ray included.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not snapshot_checkpoints(output / RUN_NAME):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            kill_session(process)
    assert process.returncode == 130, err[-3000:]
    # Lines of Ray's own actors aside: with a second Ray on the machine (this test session's),
    # Ray Train's placement-group cleaner logs a traceback of its own when the run goes away.
    ours = [line for line in (out + err).splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=\d+", line)]
    assert not any("Traceback" in line for line in ours), err[-3000:]
    latest = recorded_checkpoint(str(output))
    assert err.strip().splitlines()[-1] == (f"maskray train: interrupted: the run in {output} keeps its checkpoints up "
                                            f"to {latest}; the same command with --resume goes on from there")


def test_rays_traceback_of_our_own_worker_error_is_left_to_the_driver():
    """Ray Train logs every worker error with its traceback; ours (the driver says them in one
    line) are dropped from that log, a bug's are kept."""
    import logging

    from maskray.pipeline.train.loop import _SaidByTheDriver

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("ray.train.v2._internal.util", logging.ERROR, __file__, 1, text, None, None)

    traceback = 'Error in training function:\nTraceback (most recent call last):\n  File "loop.py", line 1\n'
    said = _SaidByTheDriver()
    assert not said.filter(record(traceback + "maskray.pipeline.errors.TrainingError: the loss is nan\n"))
    assert said.filter(record(traceback + "KeyError: 'boxes'\n"))
    assert said.filter(record("Reporting training result 1"))
