"""The ``maskray`` command line: its options are the settings dataclasses' fields (one source for
names, defaults, choices and checks), ``--help`` comes back without torch, and user errors are
caught in one place, as one line with exit status 2 and no credentials."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from maskray.jobs import cli
from maskray.jobs import segment as segment_job
from maskray.jobs import train as train_job
from maskray.jobs.arguments import dataclass_from_namespace
from maskray.pipeline.errors import Interrupted, JobError, StorageError, TrainingError
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.train.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_REQUIRED = ["in", "out"]  # --weights has a default: coco-v2
TRAIN_REQUIRED = ["--train-json", "t.json", "--train-images", "img", "--output", "run"]
COMMANDS = [(SegmentJob, segment_job, SEGMENT_REQUIRED), (TrainSettings, train_job, TRAIN_REQUIRED)]


def parser_of(job_module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    job_module.add_arguments(parser)
    return parser


@pytest.mark.parametrize("settings_class, job_module, required", COMMANDS, ids=["segment", "train"])
def test_every_field_is_an_option_with_help(settings_class, job_module, required):
    actions = {action.dest: action for action in parser_of(job_module)._actions}
    for field in dataclasses.fields(settings_class):
        action = actions.get(field.metadata.get("dest", field.name))
        assert action is not None, f"{settings_class.__name__}.{field.name} has no option"
        assert action.help, field.name
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            assert action.required or not action.option_strings, f"{field.name} is required by the dataclass"


@pytest.mark.parametrize("settings_class, job_module, required", COMMANDS, ids=["segment", "train"])
def test_defaults_are_the_dataclass_defaults(settings_class, job_module, required):
    parsed = dataclass_from_namespace(settings_class, parser_of(job_module).parse_args(required))
    # The required values, by field name, from what was parsed; everything else from the dataclass.
    given = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(settings_class)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert parsed == settings_class(**given)


def test_segment_options_reach_the_job():
    args = parser_of(segment_job).parse_args(SEGMENT_REQUIRED + ["--weights", "w.pt",
        "--batch-size", "3", "--shard-size", "5", "--score-threshold", "0.25", "--max-pixels", "1000",
        "--storage-options", '{"anon": true}', "--no-progress", "--num-actors", "2", "--actor-start-timeout", "30"])
    job = dataclass_from_namespace(SegmentJob, args)
    # Paths are resolved where they were typed: the actors run in folders of their own.
    assert (job.input, job.output, job.weights) == tuple(os.path.abspath(p) for p in ("in", "out", "w.pt"))
    assert (job.batch_size, job.shard_size, job.score_threshold, job.max_pixels) == (3, 5, 0.25, 1000)
    assert job.storage_options == {"anon": True} and job.progress is False and job.num_actors == 2
    assert job.actor_start_timeout == 30.0


def test_train_options_reach_the_settings():
    args = parser_of(train_job).parse_args(TRAIN_REQUIRED + [
        "--model-option", "max_size=192", "--model-option", "min_size=[128,160]", "--model-option", "pooler=roi_pool",
        "--lr-steps", "8", "11", "--no-amp", "--gpu", "--resume", "--schedule", "cosine", "--export-dtype", "float16",
        "--address", "ray://head:10001"])
    settings = dataclass_from_namespace(TrainSettings, args)
    assert settings.model_options == {"max_size": 192, "min_size": (128, 160), "pooler": "roi_pool"}
    assert settings.lr_steps == (8, 11) and settings.amp is False and settings.gpu and settings.resume
    assert (settings.schedule, settings.export_dtype) == ("cosine", "float16")
    assert args.address == "ray://head:10001"  # the driver's, not a setting
    # A second parse starts from empty model options: the default dict is never filled in place.
    assert dataclass_from_namespace(TrainSettings, parser_of(train_job).parse_args(TRAIN_REQUIRED)).model_options == {}


def test_choices_come_from_the_settings():
    with pytest.raises(SystemExit) as exited:
        parser_of(train_job).parse_args(TRAIN_REQUIRED + ["--preset", "resnet101"])
    assert exited.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["train", *TRAIN_REQUIRED, "--lr", "0"], "maskray train: error: lr must be positive (got 0.0)"),
    (["train", *TRAIN_REQUIRED, "--workers", "0"], "maskray train: error: workers must be at least 1 (got 0)"),
    (["segment", *SEGMENT_REQUIRED, "--batch-size", "0"],
     "maskray segment: error: batch_size must be at least 1, got 0"),
    (["segment", *SEGMENT_REQUIRED, "--num-actors", "-1"],
     "maskray segment: error: num_actors must be at least 1, got -1"),
    (["segment", *SEGMENT_REQUIRED, "--score-threshold", "2"],
     "maskray segment: error: score_threshold must be in [0, 1], got 2.0"),
    (["train", *TRAIN_REQUIRED, "--val-json", "v.json"],
     "maskray train: error: validation needs both --val-json and --val-images"),
    (["segment", *SEGMENT_REQUIRED, "--actor-start-timeout", "0"],
     "maskray segment: error: actor_start_timeout must be positive, got 0.0"),
])
def test_a_value_the_settings_refuse_is_one_line_and_exit_status_2(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message] and captured.out == ""


@pytest.mark.parametrize("argv, message", [
    (["train", *TRAIN_REQUIRED, "--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["segment", *SEGMENT_REQUIRED, "--batch-size", "0.5"], "argument --batch-size: invalid int value: '0.5'"),
    (["segment", *SEGMENT_REQUIRED, "--score-threshold", "high"], "argument --score-threshold: invalid float value"),
])
def test_a_value_that_is_not_a_number_is_argparses_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("settings_class", [SegmentJob, TrainSettings])
def test_numbers_are_parsed_plain_and_their_ranges_checked_by_the_settings_alone(settings_class):
    numbers = (int, float, int | None, float | None)
    hints = typing.get_type_hints(settings_class)
    for field in dataclasses.fields(settings_class):
        if hints[field.name] in numbers:
            assert "type" not in field.metadata, f"{field.name}: its range is the dataclass's to check"


@pytest.mark.parametrize("command", ["segment", "train"])
def test_help_does_not_import_torch(command):
    script = ("import sys\nimport maskray.jobs.cli as c\ntry:\n    c.main([%r, '--help'])\nexcept SystemExit as e:\n"
              "    assert e.code == 0\nprint('torch' in sys.modules)" % command)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False", f"maskray {command} --help imported torch"


# The one catch ---------------------------------------------------------------------------------


@pytest.fixture
def fake_command(monkeypatch):
    """A ``maskray fake`` subcommand whose run raises the exception a test gives it."""
    module = types.ModuleType("maskray_fake_command")
    raised: list[BaseException] = []

    def add_arguments(parser):
        from maskray.jobs.arguments import add_storage_options_argument

        add_storage_options_argument(parser)

    @cli.reports_user_errors
    def run(args):
        raise raised[0]

    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", (module.__name__, "raises what the test says"))
    return raised


@pytest.mark.parametrize("error", [
    StorageError("s3://b/x: access was refused (key hunter2-secret-key)"),
    JobError("s3://b/out holds the output of a different job"),
    TrainingError("training failed:\nworker 0: the loss is NaN"),
    FileNotFoundError("s3://b/x: no such file"),
    ValueError("batch_size must be at least 1, got 0"),
], ids=lambda e: type(e).__name__)
def test_user_errors_are_one_redacted_line_and_exit_status_2(fake_command, error, capsys):
    fake_command.append(error)
    options = json.dumps({"key": "hunter2-secret-key", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    assert cli.main(["fake", "--storage-options", options]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("maskray fake: error: "), err
    assert "hunter2-secret-key" not in err and "Traceback" not in err
    assert " ".join(str(error).split()) in " ".join(err.split()).replace("***", "hunter2-secret-key")


def test_a_bug_keeps_its_traceback(fake_command):
    fake_command.append(KeyError("a bug"))
    with pytest.raises(KeyError):
        cli.main(["fake"])


def test_debug_lets_the_error_through_with_its_traceback(fake_command, monkeypatch):
    fake_command.append(StorageError("s3://b/x: access was refused"))
    with pytest.raises(StorageError):
        cli.main(["fake", "--debug"])
    monkeypatch.setenv("MASKRAY_DEBUG", "1")  # for `ray job submit -- python -m ...`, where flags are typed once
    with pytest.raises(StorageError):
        cli.main(["fake"])


@pytest.mark.parametrize("interrupt, said", [
    (KeyboardInterrupt(), "maskray fake: interrupted: stopped by Ctrl-C"),
    (Interrupted("3 of 8 shards are committed in out; the same command resumes from there"),
     "maskray fake: interrupted: 3 of 8 shards are committed in out; the same command resumes from there"),
], ids=["KeyboardInterrupt", "Interrupted"])
def test_ctrl_c_is_one_line_and_exit_status_130(fake_command, interrupt, said, capsys):
    fake_command.append(interrupt)
    assert cli.main(["fake"]) == 130
    assert capsys.readouterr().err == said + "\n"


def test_terminal_colour_codes_never_reach_the_line(fake_command, capsys):
    fake_command.append(ValueError("w.pt: \x1b[1mUnpickler\x1b[0m refused \x1b[31;1mMaskRCNN\x1b[0m\n  a second line"))
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == "maskray fake: error: w.pt: Unpickler refused MaskRCNN a second line\n"


def test_every_command_reports_user_errors_through_the_one_catch():
    import importlib

    for name, (module_name, _) in cli.SUBCOMMANDS.items():
        run = importlib.import_module(module_name).run
        assert getattr(run, "__wrapped__", None) is not None and run.__name__ == "run", name
        assert run.__code__ is cli.reports_user_errors(lambda args: 0).__code__, name


def test_a_real_command_reports_its_error(tmp_path, capsys):
    (tmp_path / "set").write_text("a file where the folder would go")
    assert cli.main(["make-shapes", str(tmp_path / "set"), "--count", "1", "--size", "32x32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskray make-shapes: error: ") and len(err.splitlines()) == 1, err


# The one weights reader, as segment, evaluate and train --init use it ----------------------------------


def test_weights_errors_name_the_flag_and_the_file(tmp_path):
    import torch

    from maskray.pipeline.train.initial_weights import initial_state
    from maskray.pipeline.weights import build_model, read_weights

    with pytest.raises(FileNotFoundError, match=r"^--init .*absent\.pt: no such file$"):
        read_weights(str(tmp_path / "absent.pt"), flag="--init")
    files = {"list.pt": [1, 2], "other.pt": {"a": torch.zeros(1)},
             "newer.pt": {"format": "maskray.checkpoint", "format_version": 99}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "text.pt").write_text("not a weights file")
    expected = {"list.pt": "neither a maskray checkpoint nor a state dict", "other.pt": "not a torchvision maskrcnn",
                "newer.pt": "checkpoint format 99 is newer", "text.pt": "not a loadable weights file"}
    for name, message in expected.items():
        path = re.escape(str(tmp_path / name))
        with pytest.raises(ValueError, match=f"^--weights {path}: {message}"):
            build_model(read_weights(str(tmp_path / name)))
        with pytest.raises(ValueError, match=f"^--init {path}: {message}"):
            initial_state(read_weights(str(tmp_path / name), flag="--init"))


def test_a_folder_or_a_path_through_a_file_as_weights_names_the_flag_and_the_file(tmp_path):
    from maskray.pipeline.weights import read_weights

    folder = tmp_path / "run"
    folder.mkdir()
    # Still the kind read_object raised (a folder: IsADirectoryError, and FileNotFoundError too).
    with pytest.raises(IsADirectoryError, match=f"^--weights {re.escape(str(folder))}: "):
        read_weights(str(folder))
    (tmp_path / "model.pt").write_bytes(b"")
    through_a_file = tmp_path / "model.pt" / "inner.pt"
    with pytest.raises(OSError, match=f"^--init {re.escape(str(through_a_file))}: "):
        read_weights(str(through_a_file), flag="--init")


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_a_folder_as_weights_is_one_plain_line_of_the_command(tmp_path, capsys, command):
    # Before any Ray or model work: the line names the flag and the folder, not Python's type names.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"not read")
    arguments = {"segment": [str(tmp_path / "images"), str(tmp_path / "out")],
                 "evaluate": ["--json", str(tmp_path / "x.json"), "--images", str(tmp_path / "images")]}[command]
    assert cli.main([command, *arguments, "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"maskray {command}: error: --weights {tmp_path}: is a folder, not a file\n"


def test_a_maskray_checkpoint_is_decoded_once(tmp_path, monkeypatch):
    import torch

    from maskray.model import MaskRCNN, MaskRCNNConfig
    from maskray.pipeline.weights import build_model, read_weights

    MaskRCNN(MaskRCNNConfig.light(3, ("__background__", "a", "b"))).save(tmp_path / "model.pt")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    model = build_model(read_weights(str(tmp_path / "model.pt")), {"box_score_thresh": 0.5})
    assert len(loads) == 1
    assert model.config.class_names == ("__background__", "a", "b") and model.config.box_score_thresh == 0.5
