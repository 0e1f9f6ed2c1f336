"""The maskray.* namespace: nothing named ``model``, ``pipeline`` or ``jobs`` is installed, and a
job started from a user's folder that holds its own model.py, pipeline.py and jobs.py runs our
code, not theirs.

That folder is what users have, and Ray puts it first on its workers' import path: on a local
cluster the driver's cwd (sys.path[0] of every worker), under ``ray job submit --working-dir .``
Ray's unpacked copy of it (the job's cwd and its workers' PYTHONPATH). Before the namespace, our
workers imported the user's model.py instead of ours. Here the user's modules raise when
imported, so any such import fails the job loudly. Every job runs in a subprocess with a
temporary HOME (Ray keeps its auth token in ~/.ray) and without RAY_ADDRESS, so that the tests
depend on nothing of the machine's. The ``ray job submit`` case is tests/test_cluster_way.py's,
whose user folder holds the same traps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskray.pipeline.results.query import connect
from maskray.pipeline.train.shapes import make_image

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the tests run with the venv's python; its scripts are beside it
WEIGHTS = REPO / "model" / "weights" / "shapes_light.pt"
PACKAGES = ("model", "pipeline", "jobs")  # the repository's folders, installed as maskray.<name> only
IMAGES = [f"{i:03d}.png" for i in range(3)]


def job_environment(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a job's processes: a HOME of the test's own, no cluster to join, the
    checkout importable only through the install, and Ray on loopback only (pipeline/cluster.py)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PYTHONPATH") and not k.startswith("RAY_AUTH_")}
    # PATH: a job's entrypoint says `python`, which must be the venv's (the machine may have none).
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}")
    return {**env, **extra}


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture
def user_folder(tmp_path) -> Path:
    return make_user_folder(tmp_path)


def make_user_folder(tmp_path: Path) -> Path:
    """A user's project folder: a few images, and model.py, pipeline.py and jobs.py of their own
    (and a HOME beside it)."""
    folder = tmp_path / "project"
    (folder / "images").mkdir(parents=True)
    for name in PACKAGES:
        (folder / f"{name}.py").write_text(f"raise ImportError(\"the user's {name}.py was imported\")\n")
    for index, name in enumerate(IMAGES):
        (folder / "images" / name).write_bytes(make_image(seed=5, index=index, width=96, height=80)[0])
    (tmp_path / "home").mkdir()
    return folder


def assert_every_image_segmented(output: Path) -> None:
    """Every image of the folder exactly once in the output's images table, all of them ok."""
    rows = connect(str(output)).sql("SELECT image_uri, status FROM images").fetchall()
    assert sorted(uri.rsplit("/", 1)[-1] for uri, _ in rows) == IMAGES, rows
    assert {status for _, status in rows} == {"ok"}, rows


# -----------------------------------------------------------------------------------------------
# What is installed


@pytest.mark.slow
def test_only_the_maskray_namespace_is_importable(tmp_path):
    # In a fresh interpreter outside the checkout: inside it, the folders themselves would import.
    probe = ("import importlib, importlib.util, json, maskray\n"
             f"shadowable = [n for n in {PACKAGES!r} if importlib.util.find_spec(n) is not None]\n"
             "for name in ('maskray.model', 'maskray.pipeline.segment.job', 'maskray.jobs.cli'):\n"
             "    importlib.import_module(name)\n"
             "print(json.dumps({'shadowable': shadowable, 'maskray_file': maskray.__file__}))\n")
    done = run([sys.executable, "-c", probe], tmp_path, job_environment(tmp_path), timeout=120)
    assert done.returncode == 0, done.stdout
    found = json.loads(done.stdout.splitlines()[-1])
    assert found == {"shadowable": [], "maskray_file": None}  # maskray: a namespace package, no __init__.py


@pytest.mark.slow
def test_the_distribution_installs_only_maskray(tmp_path):
    """The pure-Python part of the distribution, as a wheel would lay it out (build_py does not
    compile the extension; it takes a few seconds, most of them setup.py importing torch)."""
    build = tmp_path / "lib"
    # egg_info would otherwise write maskray.egg-info into the checkout.
    command = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", tmp_path, "build_py", "--build-lib", build]
    done = run(command, REPO, dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stdout
    assert [p.name for p in build.iterdir()] == ["maskray"]
    assert sorted(p.name for p in (build / "maskray").iterdir()) == sorted(PACKAGES)  # and no __init__.py
    for name in PACKAGES:  # every module of the folders, none left out of pyproject.toml's `packages`
        ours = {p.relative_to(REPO / name) for p in (REPO / name).rglob("*.py") if "__pycache__" not in p.parts}
        assert {p.relative_to(build / "maskray" / name) for p in (build / "maskray" / name).rglob("*.py")} == ours
    shipped = build / "maskray" / "model" / "weights" / "shapes_light.pt"  # package data: the demo's weights
    assert shipped.read_bytes() == WEIGHTS.read_bytes()


# -----------------------------------------------------------------------------------------------
# A job started from the user's folder


def test_user_modules_would_fail_the_job_if_imported(user_folder):
    """The trap is armed: in the user's folder, `import model` is the user's file and fails."""
    env = job_environment(user_folder.parent / "home")
    for name in PACKAGES:
        done = run([sys.executable, "-c", f"import {name}"], user_folder, env, timeout=60)
        assert done.returncode != 0 and f"the user's {name}.py was imported" in done.stdout


@pytest.mark.slow
def test_segment_from_a_user_folder_on_a_local_cluster(user_folder):
    # The job's ray.init starts a cluster with token authentication, and writes the token it makes
    # to ~/.ray/auth_token: the temporary HOME's, not the machine's.
    env = job_environment(user_folder.parent / "home")
    command = [VENV_BIN / "maskray", "segment", "images/", "out/", "--weights", WEIGHTS, "--no-progress"]
    done = run(command, user_folder, env, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:]
    assert f"{len(IMAGES)} images (0 errors)" in done.stdout
    assert_every_image_segmented(user_folder / "out")
