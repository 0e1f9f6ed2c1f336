"""One line for every mistake, in every command: no traceback, the input named, exit status 2.

Each command (segment, train, evaluate, query, show) is run as the user runs it, through
``maskray.jobs.cli.main``, against the storage mistakes people make (no credentials, an
endpoint that does not answer, a bucket that does not exist), an output that is not one, an
output that holds other files, a bad SQL statement; and a job stopped by Ctrl-C (a real
SIGINT to a real ``maskray segment``) says how far it got, and its command resumes it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskray.jobs.cli import main
from maskray.pipeline.results.query import connect
from maskray.pipeline.storage import open_url
from maskray.pipeline.train.shapes import make_image, write_shapes
from tests.faults import FaultProxy, FaultRule
from tests.test_query_show import write_output
from tests.test_storage import without_waits

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = str(REPO / "model" / "weights" / "shapes_light.pt")


def one_line(capsys, command: str) -> str:
    """The one line a command printed on stderr (asserting it is one and says ``error``); stdout is empty."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"maskray {command}: error: "), captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return lines[0]


def argv_of(command: str, root: str, options: dict, tmp_path: Path) -> list[str]:
    """``command``'s arguments with every URL under ``root`` (a bucket URL)."""
    storage = ["--storage-options", json.dumps(options)]
    return {
        "segment": ["segment", f"{root}/in/", f"{root}/out", "--weights", WEIGHTS, "--no-progress"],
        "train": ["train", "--train-json", f"{root}/set/annotations.json", "--train-images", f"{root}/set/images",
                  "--output", f"{root}/run", "--no-progress"],
        "evaluate": ["evaluate", "--weights", WEIGHTS, "--json", f"{root}/set/annotations.json",
                     "--images", f"{root}/set/images", "--no-progress"],
        "query": ["query", f"{root}/out", "SELECT count(*) FROM images"],
        "show": ["show", f"{root}/out", "a.png", "-o", str(tmp_path / "a-overlay.png")],
    }[command] + storage


COMMANDS = ("segment", "train", "evaluate", "query", "show")


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """A machine without AWS credentials anywhere botocore looks (and no instance metadata to ask)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_credentials(command, s3, no_aws_credentials, tmp_path, capsys, monkeypatch):
    without_waits(monkeypatch)
    options = {"client_kwargs": s3.storage_options["client_kwargs"], "skip_instance_cache": True}
    assert main(argv_of(command, s3.url(), options, tmp_path)) == 2
    line = one_line(capsys, command)
    assert f"s3://{s3.name}" in line and "no credentials were found" in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_refused_credentials(command, s3, tmp_path, capsys, monkeypatch):
    without_waits(monkeypatch)
    with FaultProxy(s3.endpoint, [FaultRule("403")]) as proxy:  # every request: an unknown access key
        options = {**s3.storage_options, "client_kwargs": {**s3.storage_options["client_kwargs"],
                                                           "endpoint_url": proxy.endpoint}}
        assert main(argv_of(command, s3.url(), options, tmp_path)) == 2
    line = one_line(capsys, command)
    assert f"s3://{s3.name}" in line and "access was refused: check the credentials" in line, line
    assert s3.storage_options["secret"] not in line


@pytest.mark.parametrize("command", COMMANDS)
def test_an_endpoint_that_does_not_answer(command, tmp_path, capsys, monkeypatch):
    without_waits(monkeypatch)
    # Port 9 (discard) on loopback: nothing listens. botocore's own retries off, so the test is quick.
    options = {"key": "k", "secret": "s", "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    assert main(argv_of(command, "s3://somewhere", options, tmp_path)) == 2
    line = one_line(capsys, command)
    assert "s3://somewhere" in line and "the storage endpoint cannot be reached" in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bucket_that_does_not_exist(command, s3, tmp_path, capsys, monkeypatch):
    without_waits(monkeypatch)
    assert main(argv_of(command, "s3://no-such-bucket-here", s3.storage_options, tmp_path)) == 2
    line = one_line(capsys, command)
    assert "s3://no-such-bucket-here" in line and "does not exist" in line, line
    assert s3.storage_options["secret"] not in line


@pytest.mark.parametrize("command", COMMANDS)
def test_a_prefix_that_does_not_exist(command, s3, tmp_path, capsys, monkeypatch):
    without_waits(monkeypatch)
    assert main(argv_of(command, s3.url(), s3.storage_options, tmp_path)) == 2
    line = one_line(capsys, command)
    # Whatever each command reads first: the input, the JSON, or the output to query.
    assert f"s3://{s3.name}/" in line and ("no such" in line or "does not exist" in line), line


# -----------------------------------------------------------------------------------------------
# Outputs: maskray's or nothing


@pytest.fixture
def user_folder(tmp_path, monkeypatch) -> Path:
    """A folder of the user's: a few images and files of their own; the commands run from it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    for index in range(3):
        (tmp_path / "images" / f"{index}.png").write_bytes(make_image(seed=3, index=index, width=64, height=48)[0])
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "thesis.tex").write_text("\\documentclass{article}")
    return tmp_path


def test_a_bad_storage_options_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "options.json").write_text('{"secret": "hunter2-in-a-file"')
    with pytest.raises(SystemExit) as exited:
        main(["query", "out", "SELECT 1", "--storage-options", "@options.json"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "options.json: not valid JSON" in err and "hunter2" not in err, err


@pytest.mark.parametrize("command", ["query", "show"])
def test_a_folder_that_is_no_output(command, user_folder, capsys):
    argv = {"query": ["query", ".", "SELECT count(*) FROM images"], "show": ["show", ".", "0.png"]}[command]
    assert main(argv) == 2
    line = one_line(capsys, command)
    assert "not a segmentation output" in line and "no _manifest.json" in line and "notes.txt" in line, line


@pytest.mark.parametrize("command", ["query", "show"])
def test_an_output_that_is_not_there(command, user_folder, capsys):
    argv = {"query": ["query", "out", "SELECT 1"], "show": ["show", "out", "0.png"]}[command]
    assert main(argv) == 2
    line = one_line(capsys, command)
    assert "out: no such file or prefix" in line, line


def test_segment_refuses_an_output_holding_other_files(user_folder, capsys):
    assert main(["segment", "images/", ".", "--weights", WEIGHTS, "--no-progress"]) == 2
    line = one_line(capsys, "segment")
    assert f"{user_folder} holds files that are not a segmentation output's" in line, line
    assert "images, notes.txt, thesis.tex" in line and "choose a new folder" in line, line
    assert sorted(p.name for p in user_folder.iterdir()) == ["images", "notes.txt", "thesis.tex"]  # nothing written


def test_train_refuses_an_output_holding_other_files(user_folder, capsys):
    write_shapes("set", 2, seed=1, size=(64, 48))
    assert main(["train", "--train-json", "set/annotations.json", "--train-images", "set/images", "--output", "set",
                 "--no-progress"]) == 2
    line = one_line(capsys, "train")
    assert "set holds files that are not a training run's (annotations.json, images)" in line, line


def test_train_names_a_relative_path_that_is_not_there(user_folder, capsys):
    assert main(["train", "--train-json", "data/train.json", "--train-images", "data/images", "--output", "run",
                 "--no-progress"]) == 2
    line = one_line(capsys, "train")
    assert "data/train.json" in line and "no such file" in line, line
    assert not (user_folder / "run").exists()  # failed before any work


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_typo_in_the_images_folder_names_the_folder(command, user_folder, capsys):
    write_shapes("set", 2, seed=1, size=(64, 48))
    argv = {"train": ["train", "--train-json", "set/annotations.json", "--train-images", "set/imagse",
                      "--output", "run", "--no-progress"],
            "evaluate": ["evaluate", "--weights", WEIGHTS, "--json", "set/annotations.json", "--images", "set/imagse",
                         "--no-progress"]}[command]
    assert main(argv) == 2
    line = one_line(capsys, command)
    assert "set/imagse: no such folder or prefix" in line, line


def test_bad_sql_is_one_line_naming_the_mistake(tmp_path, capsys):
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, "file:///photos/a.png")  # a finished output, committed directly
    assert main(["query", str(output), "SELEC label_name FROM instances"]) == 2
    line = one_line(capsys, "query")
    assert "the SQL cannot run" in line and "syntax error" in line and "SELEC" in line, line
    assert main(["query", str(output), "SELECT nonsense FROM instances"]) == 2
    assert "nonsense" in one_line(capsys, "query")
    assert main(["query", str(output), "SELECT * FROM instance"]) == 2
    assert 'Did you mean "instances"' in one_line(capsys, "query")  # DuckDB's hint kept, its quote of the SQL not


# -----------------------------------------------------------------------------------------------
# A job stopped midway: Ctrl-C, an unfinished output


def test_ctrl_c_stops_the_job_in_one_line_and_the_same_command_resumes(tmp_path):
    images, shards = 16, 8
    folder = tmp_path / "pictures"
    folder.mkdir()
    for index in range(images):
        (folder / f"{index:02d}.png").write_bytes(make_image(seed=6, index=index, width=96, height=80)[0])
    output = tmp_path / "out"
    command = [sys.executable, "-m", "maskray.jobs.segment", str(folder), str(output), "--weights", WEIGHTS,
               "--shard-size", "2", "--num-actors", "1", "--batch-size", "1", "--no-progress"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # Its own process group, as a shell's foreground job: Ctrl-C signals the whole group (the
    # local Ray that the job started included), not only the driver.
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (output / "_done").is_dir() or not any((output / "_done").iterdir()):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C sends
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    last = err.strip().splitlines()[-1]
    committed = len(list((output / "_done").iterdir()))
    assert last == (f"maskray segment: interrupted: {committed} of {shards} shards are committed in {output}; "
                    "the same command resumes from there"), err[-3000:]
    assert 0 < committed < shards

    # The output, unfinished: query answers from the committed shards, and says how far it got.
    said = subprocess.run([sys.executable, "-m", "maskray.jobs.cli", "query", str(output),
                           "SELECT count(*) FROM images"], capture_output=True, text=True, timeout=120, check=False)
    assert said.returncode == 0, said.stderr
    assert f"{2 * committed}" in said.stdout
    assert said.stderr.strip() == (f"maskray query: note: {output} is unfinished: {committed} of {shards} shards committed "
                                   "(the job is running, or was stopped: its command resumes it); this answer covers "
                                   "the committed shards")

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"this run: {shards - committed} of {shards} shards" in again.stdout
    rows = connect(str(output)).sql("SELECT image_uri, count(*) FROM images GROUP BY 1 HAVING count(*) > 1").fetchall()
    assert rows == [] and connect(str(output)).sql("SELECT count(*) FROM images").fetchall() == [(images,)]
