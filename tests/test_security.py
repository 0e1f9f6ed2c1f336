"""Security with real parts: a checkpoint that carries pickled code is refused by every entry
point that reads weights, credentials planted in the command line, the storage options and the
environment never reach the logs (ours and Ray's), the output or its error rows, and a local
Ray cluster that maskray starts listens on 127.0.0.1 only, its dashboard too."""

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# Pickled code ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs os.makedirs(marker): proof, if the marker appears, that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.fixture
def crafted_weights(tmp_path) -> tuple[Path, Path]:
    """A weights file that looks like a state dict and runs code when fully unpickled."""
    from maskray.model import MaskRCNN, MaskRCNNConfig

    marker = tmp_path / "code-ran"
    state = MaskRCNN(MaskRCNNConfig.light(num_classes=3, min_size=(64,), max_size=64)).state_dict()
    state["roi_heads.box_predictor.cls_score.bias"] = _Payload(str(marker))
    path = tmp_path / "crafted.pt"
    torch.save(state, path)  # a full pickle, as an attacker would write it
    torch.load(path, weights_only=False)  # the payload really works when unpickled unsafely...
    assert marker.exists()
    marker.rmdir()  # ...so its absence below means it never ran
    return path, marker


def test_pickled_code_in_weights_is_refused_by_every_entry_point(crafted_weights, tmp_path, capsys):
    from maskray.jobs.cli import main
    from maskray.pipeline.train.shapes import write_shapes

    path, marker = crafted_weights
    write_shapes(str(tmp_path / "data"), 2, seed=1, size=(64, 64))
    images, annotations = str(tmp_path / "data" / "images"), str(tmp_path / "data" / "annotations.json")
    runs = {
        "segment": ["segment", images, str(tmp_path / "out"), "--weights", str(path), "--no-progress"],
        "evaluate": ["evaluate", "--weights", str(path), "--json", annotations, "--images", images, "--no-progress"],
        "train": ["train", "--train-json", annotations, "--train-images", images, "--output", str(tmp_path / "run"),
                  "--init", str(path), "--workers", "1", "--no-progress"],
    }
    for command, argv in runs.items():
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        flag = "--init" if command == "train" else "--weights"
        assert f"{flag} {path}: not a loadable weights file" in err and "Traceback" not in err, (command, err)
        assert len(err.splitlines()) == 1, (command, err)  # the one line of the one catch
        assert not marker.exists(), f"maskray {command} ran the checkpoint's code"
    assert not (tmp_path / "out").exists()  # refused before any work: nothing written


def test_every_torch_load_is_weights_only():
    """A source check: no code path of ours unpickles a file with torch.load's unsafe default."""
    offenders = []
    for folder in ("model", "pipeline", "jobs", "bench"):
        for file in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


# Credentials ---------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((96, 72), 40 + seed).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _texts_of_output(fs, root: str) -> str:
    """Everything a user of the output can read: Parquet files decoded (values and key-value
    metadata; their bytes are compressed, so a grep of them would prove nothing), other files
    as they are."""
    texts = []
    for path in sorted(fs.find(root)):
        data = fs.cat_file(path)
        if path.endswith(".parquet"):
            parquet = pq.ParquetFile(io.BytesIO(data))
            texts.append(json.dumps(parquet.read().to_pylist(), default=str))
            texts.append(repr(parquet.schema_arrow.metadata))
        else:
            texts.append(data.decode("utf-8", errors="replace"))
    assert texts, f"nothing under {root}"
    return "\n".join(texts)


def _texts_under(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", errors="replace") for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.slow
def test_credentials_never_reach_logs_outputs_or_error_rows(s3, tmp_path):
    """The job as users run it, twice: credentials on the command line (storage options), then
    from the environment. Planted secrets are searched for in the console, Ray's own logs, every
    output file (decoded), and the error rows, which quote storage errors."""
    from maskray.pipeline.results.query import connect

    fs = s3.filesystem()
    for i in range(3):
        fs.pipe_file(f"{s3.name}/in/img{i}.png", _png(i))
    fs.pipe_file(f"{s3.name}/in/broken.png", b"<html>denied</html>")
    listing = [s3.url("in", f"img{i}.png") for i in range(3)] + [s3.url("in", "broken.png"), s3.url("in", "gone.png")]
    fs.pipe_file(f"{s3.name}/list.txt", "\n".join(listing).encode())

    from maskray.model import MaskRCNN, MaskRCNNConfig

    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    MaskRCNN(MaskRCNNConfig.light(num_classes=3, min_size=(64,), max_size=96, box_detections_per_img=4)).save(weights)

    cli_key, cli_secret = "AKIAPLANTEDCLIKEY9", "planted-cli-secret-Zq81"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAPLANTEDENVKEY7", "AWS_SECRET_ACCESS_KEY": "planted-env-secret-Wx52",
           "AWS_SESSION_TOKEN": "planted-env-session-token-Kj33", "PYTHONPATH": str(ROOT)}
    secrets = [cli_key, cli_secret, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_SESSION_TOKEN"]]
    endpoint_only = {"client_kwargs": {"endpoint_url": s3.endpoint, "region_name": "us-east-1"}}
    with_keys = {**endpoint_only, "key": cli_key, "secret": cli_secret}
    ray_dir = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env["RAY_TMPDIR"] = str(ray_dir)
    env.pop("RAY_ADDRESS", None)
    console = []

    def maskray(*argv: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "maskray.jobs.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        console.append(done.stdout + done.stderr)
        return done

    try:
        for name, options in (("cli", with_keys), ("env", endpoint_only)):
            output = s3.url(f"out-{name}")
            done = maskray("segment", s3.url("list.txt"), output, "--weights", str(weights), "--shard-size", "2",
                           "--storage-options", json.dumps(options), "--no-progress")
            assert done.returncode == 0, done.stderr
            con = connect(output, with_keys)
            assert con.sql("SELECT count(*) FROM images WHERE status = 'ok'").fetchall()[0][0] == 3
            errors = dict(con.sql("SELECT image_uri, error FROM images WHERE status = 'error'").fetchall())
            assert "does not exist" in errors[s3.url("in", "gone.png")]  # the storage error is quoted...
            assert "not an image" in errors[s3.url("in", "broken.png")]
            text = _texts_of_output(fs, f"{s3.name}/out-{name}")
            for secret in secrets:
                assert secret not in text, f"a planted credential is in the output of the {name} run"
        # Failures print storage errors too: a bucket that does not exist, a query of it.
        assert maskray("segment", "s3://no-such-bucket-here/in", s3.url("x"), "--weights", str(weights),
                       "--storage-options", json.dumps(with_keys)).returncode == 2
        assert maskray("query", "s3://no-such-bucket-here/out", "SELECT 1 FROM images",
                       "--storage-options", json.dumps(with_keys)).returncode == 2
        logs = _texts_under(ray_dir)
        assert "maskray-segment" in logs or len(logs) > 10_000, "Ray's logs were not where the test looked"
        everything = "\n".join(console) + logs
        for secret in secrets:
            assert secret not in everything, "a planted credential reached the console or Ray's logs"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


# A local cluster listens on loopback only ---------------------------------------------------------

_LISTENERS = """
import json, time
import ray  # imported first, as a user's script may: maskray must still keep the cluster on loopback
import psutil
from maskray.pipeline.cluster import connect_ray

connect_ray(None, dashboard=True)

@ray.remote
class Probe:
    def ping(self):
        return 1

probe = Probe.remote()
assert ray.get(probe.ping.remote()) == 1  # a worker with its own gRPC server is up
time.sleep(2)  # the agents bind their ports shortly after start
family = [psutil.Process()] + psutil.Process().children(recursive=True)
pids = {p.pid: " ".join(p.cmdline()[:1])[-40:] for p in family}
found = [(c.laddr.ip, c.laddr.port, pids[c.pid]) for c in psutil.net_connections(kind="inet")
         if c.status == psutil.CONN_LISTEN and c.pid in pids]
print(json.dumps({"listeners": found, "gcs": ray.get_runtime_context().gcs_address}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_cluster_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["PYTHONPATH"] = str(ROOT)
    ray_dir = tempfile.mkdtemp(prefix="mr", dir="/tmp")
    env["RAY_TMPDIR"] = ray_dir
    try:
        done = subprocess.run([sys.executable, "-c", _LISTENERS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    listeners = report["listeners"]
    programs = {program for _, _, program in listeners}
    # The GCS, the raylet, the dashboard and a worker at least: else the test saw nothing.
    assert any("gcs_server" in p for p in programs) and any("raylet" in p for p in programs), listeners
    assert len(listeners) >= 6, listeners
    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    exposed = [entry for entry in listeners if entry[0] not in loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert report["gcs"].startswith("127.0.0.1:")
