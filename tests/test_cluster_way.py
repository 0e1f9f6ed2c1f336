"""The cluster way, as the README states it, and credentials kept off the command line.

``maskray cluster start`` (`ray start --head` on 127.0.0.1, dashboard, token authentication),
``ray job submit --working-dir .`` from a user's folder, ``maskray cluster stop``: the README's
commands are run here as they are written there (CLUSTER_WAY), with a temporary HOME (the
cluster's record and token live in ~/.maskray/cluster) as the only thing of the test's own:
the command picks free ports and a temp dir of its own by default, so it starts beside any
other Ray on the machine. Then: every image segmented, every socket of the cluster on
127.0.0.1, no process of it left.

Credentials: ``--storage-options @FILE`` and MASKRAY_STORAGE_OPTIONS, with planted secrets, and
the secrets searched for in Ray's job table, the jobs' logs, everything under the cluster's temp
dir (its logs, and the working dirs Ray unpacked), what every command printed, and the output.
A file inside the folder submitted is uploaded with it: the README says to keep it out, and a
planted one shows where it lands (and that the search looks there).
"""

import argparse
import json
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from maskray.jobs import cli
from maskray.jobs.arguments import add_storage_options_argument
from maskray.pipeline.options import STORAGE_OPTIONS_VARIABLE, storage_options
from tests.test_namespace import (
    IMAGES,
    REPO,
    VENV_BIN,
    WEIGHTS,
    assert_every_image_segmented,
    job_environment,
    make_user_folder,
)
from tests.test_security import _texts_of_output

# The README's block, verbatim (test_the_readme_states_the_cluster_way_verbatim holds it to that).
CLUSTER_WAY = """\
eval "$(maskray cluster start)"
ray job submit --working-dir . -- python -m maskray.jobs.segment images/ "$PWD/out" --weights model.pt
eval "$(maskray cluster stop)"
"""

# What a test looks at while the cluster runs (in the client's shell, after `eval`): the cluster's
# record, its processes' listening sockets, and that a driver of this shell joins it.
PROBE = """
import json, os, sys
import psutil
import ray
from maskray.pipeline.cluster import recorded_head

head = recorded_head()
pids = set(head.processes())
names = {pid: psutil.Process(pid).name() for pid in pids}
listening = [(c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN and c.pid in pids]
ray.init(logging_level="WARNING")  # RAY_ADDRESS, the token, and this driver on 127.0.0.1 too
joined = ray.get_runtime_context().gcs_address
ray.shutdown()
json.dump({"head": head.__dict__, "token": open(head.token_path).read(), "pids": sorted(pids), "listening": listening, "joined": joined,
           "environment": {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}},
          open(sys.argv[1], "w"))
"""

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def shell(script: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``script`` run by bash as a user's shell would, stopping at the first command that fails."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False, cwd=cwd, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    left.append(pid)
        except OSError:
            pass
    return left


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's folder, as the README's commands expect it: a few images and the model, and a
    model.py, pipeline.py and jobs.py of the user's own, which fail the job if Ray's workers (the
    folder first on their path) import them instead of maskray's (tests/test_namespace.py)."""
    folder = make_user_folder(tmp_path)
    shutil.copyfile(WEIGHTS, folder / "model.pt")
    return folder


def leftover_cleanup(home: Path) -> None:
    """Stops the cluster a failed test left running (as `maskray cluster stop` would)."""
    subprocess.run([VENV_BIN / "maskray", "cluster", "stop"], check=False, env=job_environment(home), capture_output=True,
                   timeout=120)


# -----------------------------------------------------------------------------------------------
# The cluster way


def test_the_readme_states_the_cluster_way_verbatim():
    readme = (REPO / "README.md").read_text()
    assert CLUSTER_WAY in readme, "the README's cluster way is not the one this file runs"


@pytest.mark.slow
def test_the_cluster_way_as_the_readme_states_it(project, tmp_path):
    home = tmp_path / "home"
    env = job_environment(home)
    start, submit, stop = CLUSTER_WAY.splitlines()
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    seen = tmp_path / "seen.json"
    already = tmp_path / "already.txt"
    script = "\n".join([start, submit, f"python {probe} {seen}",
                        f"if maskray cluster start 2>{already}; then exit 1; fi",  # one at a time: refused
                        stop,
                        'echo "after stop: ${RAY_ADDRESS-unset} ${RAY_API_SERVER_ADDRESS-unset}"'])
    try:
        done = shell(script, project, env, timeout=600)
    finally:
        leftover_cleanup(home)
    assert done.returncode == 0, done.stdout[-6000:]
    assert f"{len(IMAGES)} images (0 errors)" in done.stdout
    assert_every_image_segmented(project / "out")
    found = json.loads(seen.read_text())
    head = found["head"]
    assert found["environment"] == {"RAY_ADDRESS": head["gcs_address"], "RAY_API_SERVER_ADDRESS": head["dashboard_url"],
                                    "RAY_AUTH_MODE": "token"}
    assert found["joined"] == head["gcs_address"] and head["gcs_address"].startswith("127.0.0.1:")
    programs = {program for _, _, program in found["listening"]}
    assert {"gcs_server", "raylet"} <= programs and len(found["listening"]) >= 6, found["listening"]
    exposed = [entry for entry in found["listening"] if entry[0] not in LOOPBACK]
    assert not exposed, f"the cluster listens beyond loopback: {exposed}"
    assert not alive(found["pids"]), "processes of the cluster outlived `maskray cluster stop`"
    assert not Path(head["temp_dir"]).exists() and not (home / ".maskray" / "cluster" / "cluster.json").exists()
    assert done.stdout.splitlines()[-1] == "after stop: unset unset"
    refused = already.read_text()
    assert refused.startswith("maskray cluster: error: a cluster is already running") and len(refused.splitlines()) == 1
    assert found["token"] not in done.stdout and not Path(head["token_path"]).exists()  # never printed; removed by stop


def test_env_and_stop_without_a_cluster(tmp_path):
    env = job_environment(tmp_path)
    done = subprocess.run([VENV_BIN / "maskray", "cluster", "env"], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.startswith("maskray cluster: error: no cluster is running") and len(done.stderr.splitlines()) == 1
    done = subprocess.run([VENV_BIN / "maskray", "cluster", "stop"], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "no cluster is running" in done.stderr, done
    assert "unset RAY_ADDRESS" in done.stdout.splitlines()


# -----------------------------------------------------------------------------------------------
# Credentials off the command line


JOB_PROBE = """
import json, sys
from ray.job_submission import JobSubmissionClient

client = JobSubmissionClient()  # RAY_API_SERVER_ADDRESS and the token, from `maskray cluster start`
jobs = [dict(job.__dict__, logs=client.get_job_logs(job.submission_id)) for job in client.list_jobs()]
json.dump(jobs, open(sys.argv[1], "w"), default=str)
"""


@pytest.mark.slow
def test_credentials_from_a_file_or_the_environment_reach_no_log_table_or_output(project, tmp_path, s3):
    home = tmp_path / "home"
    planted = {name: secrets.token_hex(16) for name in ("file_key", "file_secret", "env_key", "env_secret", "decoy")}
    endpoint = {"client_kwargs": {"endpoint_url": s3.endpoint, "region_name": "us-east-1"}}
    # Outside the folder submitted, as the README says: given by its absolute path.
    credentials = tmp_path / "credentials" / "s3.json"
    credentials.parent.mkdir()
    credentials.write_text(json.dumps({**endpoint, "key": planted["file_key"], "secret": planted["file_secret"]}))
    # Inside it, as the README says not to: uploaded with the folder (the job does not use it).
    (project / "options.json").write_text(json.dumps({**endpoint, "key": "AKIA", "secret": planted["decoy"]}))
    fs = s3.filesystem()
    for name in IMAGES:
        fs.pipe_file(f"{s3.name}/in/{name}", (project / "images" / name).read_bytes())

    # The cluster's processes, and so its jobs, inherit MASKRAY_STORAGE_OPTIONS from `maskray cluster start`;
    # the shell that submits has none.
    from_environment = json.dumps({**endpoint, "key": planted["env_key"], "secret": planted["env_secret"]})
    env = job_environment(home)
    start = subprocess.run([VENV_BIN / "maskray", "cluster", "start"], check=False, cwd=project, timeout=300, text=True,
                           capture_output=True, env={**env, STORAGE_OPTIONS_VARIABLE: from_environment})
    console = [start.stdout, start.stderr]
    try:
        assert start.returncode == 0, start.stderr
        record = json.loads((home / ".maskray" / "cluster" / "cluster.json").read_text())
        probe, jobs_seen = tmp_path / "jobs.py", tmp_path / "jobs.json"
        probe.write_text(JOB_PROBE)
        segment = "ray job submit --working-dir . -- python -m maskray.jobs.segment"
        script = "\n".join([
            start.stdout,
            f"{segment} {s3.url('in/')} {s3.url('out-file')} --weights model.pt --storage-options @{credentials} --no-progress",
            f"{segment} {s3.url('in/')} {s3.url('out-env')} --weights model.pt --no-progress",
            f"python {probe} {jobs_seen}",
            "maskray cluster stop --keep-temp-dir"])
        done = shell(script, project, env, timeout=600)
        console.append(done.stdout)
        assert done.returncode == 0, done.stdout[-6000:]
        assert done.stdout.count(f"{len(IMAGES)} images (0 errors)") == 2, done.stdout[-6000:]
        jobs = json.loads(jobs_seen.read_text())
        assert len(jobs) == 2 and all(job["status"] == "SUCCEEDED" for job in jobs), jobs
        temp_dir = Path(record["temp_dir"])
        uploaded = list(temp_dir.glob("session_*/runtime_resources/working_dir_files/*/options.json"))
        assert uploaded, "the folder submitted was not unpacked where the test looks"
        assert planted["decoy"] in uploaded[0].read_text()  # what the README warns of

        places = {
            "Ray's job table and the jobs' logs": json.dumps(jobs),
            "what the commands printed": "\n".join(console),
            "the cluster's temp dir": "\n".join(
                p.read_bytes().decode("utf-8", errors="replace") for p in temp_dir.rglob("*")
                if p.is_file() and not p.is_symlink() and "working_dir_files" not in p.parts
                and not p.name.endswith(".zip")),
            "the output": _texts_of_output(fs, f"{s3.name}/out-file") + _texts_of_output(fs, f"{s3.name}/out-env"),
            "ray start's log": (home / ".maskray" / "cluster" / "ray-start.log").read_text(),
        }
        assert "maskray.jobs.segment" in places["the cluster's temp dir"], "Ray's logs were not where the test looked"
        for name in ("file_key", "file_secret", "env_key", "env_secret"):
            for place, text in places.items():
                assert planted[name] not in text, f"the planted {name} is in {place}"
        # The folder's copies: the uploaded options.json, and nothing else that holds a secret of the jobs'.
        for copy in temp_dir.rglob("*"):
            if copy.is_file() and not copy.is_symlink():
                data = copy.read_bytes()
                assert not any(planted[n].encode() in data for n in ("file_key", "file_secret", "env_key", "env_secret")), copy
    finally:
        leftover_cleanup(home)
        if "record" in locals():
            shutil.rmtree(record["temp_dir"], ignore_errors=True)  # kept by `stop --keep-temp-dir` to be searched


# -----------------------------------------------------------------------------------------------
# The parser of --storage-options


def parse(argv: list[str], monkeypatch, environment: str | None = None) -> argparse.Namespace:
    if environment is None:
        monkeypatch.delenv(STORAGE_OPTIONS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(STORAGE_OPTIONS_VARIABLE, environment)
    parser = argparse.ArgumentParser(prog="maskray fake")
    add_storage_options_argument(parser)
    return parser.parse_args(argv)


def usage_error(argv: list[str], monkeypatch, capsys, environment: str | None = None) -> str:
    with pytest.raises(SystemExit) as stopped:
        parse(argv, monkeypatch, environment)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


SECRET = "s3cr3t-" + "ab" * 16


def test_a_file_of_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "options.json").write_text(json.dumps({"key": "k", "secret": SECRET}))
    assert parse(["--storage-options", "@options.json"], monkeypatch).storage_options == {"key": "k", "secret": SECRET}
    absolute = f"@{tmp_path / 'options.json'}"
    assert parse(["--storage-options", absolute], monkeypatch).storage_options["secret"] == SECRET


@pytest.mark.parametrize("content, reason", [
    (None, "no such file or directory"),
    ('{"key": "k", "secret": "' + SECRET + '",}', "not valid JSON (Expecting property name enclosed in double quotes"),
    ('{"key": "k",\n "secret": ' + SECRET + '}', "not valid JSON (Expecting value at line 2 column 12)"),
    ('["' + SECRET + '"]', "must be a JSON object"),
    (b"\xff\xfe" + SECRET.encode(), "not UTF-8 text"),
], ids=["missing", "bad-json", "bad-json-lines", "not-an-object", "not-text"])
def test_a_bad_file_is_one_line_naming_it_without_its_content(tmp_path, monkeypatch, capsys, content, reason):
    monkeypatch.chdir(tmp_path)
    if isinstance(content, bytes):
        (tmp_path / "options.json").write_bytes(content)
    elif content is not None:
        (tmp_path / "options.json").write_text(content)
    line = usage_error(["--storage-options", "@options.json"], monkeypatch, capsys)
    assert line.startswith("maskray fake: error: argument --storage-options: options.json: ") and reason in line, line
    assert SECRET not in line


def test_a_folder_or_no_name_after_the_at(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "is a directory" in usage_error(["--storage-options", f"@{tmp_path}"], monkeypatch, capsys)
    assert "@ must be followed by a file name" in usage_error(["--storage-options", "@"], monkeypatch, capsys)


def test_the_environment_when_the_flag_is_not_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse([], monkeypatch).storage_options == {}
    assert parse([], monkeypatch, json.dumps({"secret": SECRET})).storage_options == {"secret": SECRET}
    (tmp_path / "env.json").write_text(json.dumps({"anon": True}))
    assert parse([], monkeypatch, "@env.json").storage_options == {"anon": True}
    assert parse([], monkeypatch, "  ").storage_options == {}  # set but empty: none


def test_the_flag_comes_before_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = parse(["--storage-options", '{"anon": true}'], monkeypatch, "not json at all, never read")
    assert given.storage_options == {"anon": True}
    (tmp_path / "options.json").write_text('{"anon": false}')
    assert parse(["--storage-options", "@options.json"], monkeypatch, '{"anon": true}').storage_options == {"anon": False}


def test_a_bad_environment_is_one_line_naming_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = usage_error([], monkeypatch, capsys, '{"secret": "' + SECRET + '"')
    assert f"argument --storage-options: {STORAGE_OPTIONS_VARIABLE}: not valid JSON" in line and SECRET not in line
    line = usage_error([], monkeypatch, capsys, "@gone.json")
    assert f"gone.json (from {STORAGE_OPTIONS_VARIABLE}): no such file or directory" in line


def test_the_settings_options_default_to_the_environment(monkeypatch):
    from maskray.jobs import segment, train

    monkeypatch.setenv(STORAGE_OPTIONS_VARIABLE, json.dumps({"secret": SECRET}))
    for module, required in ((segment, ["in", "out", "--weights", "w.pt"]),
                             (train, ["--train-json", "t.json", "--train-images", "img", "--output", "run"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.parse_args(required).storage_options == {"secret": SECRET}, module.__name__
        assert SECRET not in parser.format_help()


def test_errors_redact_options_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    """The one catch redacts what was parsed, wherever it came from (it is args.storage_options)."""
    from maskray.pipeline.errors import StorageError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "options.json").write_text(json.dumps({"key": "AKIAFILEKEY", "secret": SECRET}))

    @cli.reports_user_errors
    def run(args):
        raise StorageError(f"refused: key AKIAFILEKEY secret {SECRET}")

    for argv, environment in ((["--storage-options", "@options.json"], None), ([], "@options.json"),
                              ([], json.dumps({"key": "AKIAFILEKEY", "secret": SECRET}))):
        args = parse(argv, monkeypatch, environment)  # the parser reads the environment when it is made
        args.command = "fake"
        assert run(args) == 2
        err = capsys.readouterr().err
        assert SECRET not in err and "AKIAFILEKEY" not in err and err.count("***") == 2, err


def test_the_help_says_where_options_come_from():
    from maskray.pipeline.options import STORAGE_OPTIONS_HELP

    for said in ("@FILE", STORAGE_OPTIONS_VARIABLE, "JSON"):
        assert said in STORAGE_OPTIONS_HELP
    assert storage_options('{"anon": true}') == {"anon": True}
