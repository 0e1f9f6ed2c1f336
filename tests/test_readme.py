"""The README's commands, as written: each block is run by bash from a fresh folder, with the
relative paths it has, against a real S3-API server where it names a bucket.

Only counts are made smaller (fewer images, one epoch), each by a substitution that must find
its text, so a README that changes its commands fails here until this test follows. Every
block runs with the venv's ``maskray`` first on PATH, as after ``make setup`` and activating it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils

from maskray.model.precision import cpu_has_native_bfloat16
from maskray.pipeline.results.query import connect
from maskray.pipeline.train.shapes import make_image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent


def readme_block(heading: str, index: int = 0) -> str:
    """The ``index``-th ```bash block of the README's section ``heading`` (a "## " line)."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"```bash\n(.*?)```", section, re.DOTALL)[index]


def smaller(block: str, substitutions: dict[str, str]) -> str:
    for old, new in substitutions.items():
        assert old in block, f"the README's block no longer says {old!r}:\n{block}"
        block = block.replace(old, new)
    return block


def run_block(block: str, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """``block`` run by bash (stopping at the first command that fails); its output."""
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], check=False, cwd=cwd, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert done.returncode == 0, f"{block}\n---\n{done.stdout[-6000:]}"
    return done.stdout


def user_environment(home: Path, **extra: str) -> dict[str, str]:
    """A user's shell after ``make setup``: the venv's commands first, a HOME of their own, no cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH") and not k.startswith("AWS_")}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return {**env, **extra}


def make_fresh_folder(base: Path) -> Path:
    """``base``/work, where a block runs, beside ``base``/home, its user's HOME."""
    (base / "home").mkdir()
    (base / "work").mkdir()
    return base / "work"


@pytest.fixture
def fresh_folder(tmp_path) -> Path:
    return make_fresh_folder(tmp_path)


@pytest.mark.slow
def test_the_training_block_as_written(fresh_folder):
    block = smaller(readme_block("Training"), {"--count 2000": "--count 6", "--count 200": "--count 2",
                                               "--epochs 6": "--epochs 1"})
    said = run_block(block, fresh_folder, user_environment(fresh_folder.parent / "home"), timeout=1200)
    assert (fresh_folder / "runs" / "shapes" / "model.pt").is_file()
    assert (fresh_folder / "runs" / "shapes" / "metrics.png").is_file()
    assert "segm" in said and "AP" in said  # evaluate's table
    rows = connect(str(fresh_folder / "out")).sql("SELECT count(*), count(DISTINCT image_uri) FROM images").fetchall()
    assert rows == [(2, 2)]


@pytest.mark.slow
def test_the_bucket_block_as_written(fresh_folder, s3_server, seeded_torch_home):
    """Its bucket on the loopback S3 server, reached through the options file the block writes
    (only the endpoint is this server's), with credentials from the environment; the default
    model, coco-v2, from a torch hub cache seeded with weights of its layout (tests/hub_cache.py)."""
    import s3fs

    from tests.services import s3_storage_options

    options = s3_storage_options(s3_server)
    fs = s3fs.S3FileSystem(**options)
    if not fs.exists("bucket"):
        fs.call_s3("create_bucket", Bucket="bucket")
    for index, name in enumerate(["cat.jpg", "dog.png", "street.png"]):
        png, _ = make_image(seed=9, index=index, width=96, height=80)
        if name.endswith(".jpg"):  # a real JPEG, as cameras write
            import io

            from PIL import Image

            buffer = io.BytesIO()
            Image.open(io.BytesIO(png)).convert("RGB").save(buffer, "JPEG", quality=92)
            png = buffer.getvalue()
        fs.pipe(f"bucket/photos/{name}", png)

    block = smaller(readme_block("Segmenting a bucket"), {"https://s3.example.com": s3_server})
    env = user_environment(fresh_folder.parent / "home", AWS_ACCESS_KEY_ID=options["key"],
                           AWS_SECRET_ACCESS_KEY=options["secret"], AWS_DEFAULT_REGION="us-east-1",
                           TORCH_HOME=str(seeded_torch_home))
    said = run_block(block, fresh_folder, env, timeout=900)
    assert "3 images (0 errors)" in said
    manifest = json.loads(fs.cat_file("bucket/out/_manifest.json"))
    assert manifest["weights"]["name"] == "coco-v2" and manifest["config"]["box_head_convs"] == 4
    # "auto" asked, and what ran recorded: bf16 only on a CPU with native bfloat16.
    assert manifest["config"]["precision"] == "auto"
    assert manifest["precision"] == ["bf16" if cpu_has_native_bfloat16() else "fp32"]
    # The v2 mask head's masks: RLE that pycocotools decodes to the instance's area.
    counts, height, width, area = connect("s3://bucket/out", options).sql(
        "SELECT mask_counts, mask_height, mask_width, area FROM instances ORDER BY score DESC LIMIT 1").fetchall()[0]
    assert int(mask_utils.decode({"size": [height, width], "counts": counts.encode()}).sum()) == area > 0
    assert (fresh_folder / "cat.png").is_file()
    assert "label_name" in said  # the query's table
    assert options["secret"] not in said


@pytest.fixture(scope="module")
def after_make_demo(tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """A fresh folder after ``maskray demo`` (which ``make demo`` runs), its user's environment
    and what the demo said: one demo for the tests below, which only read its output."""
    folder = make_fresh_folder(tmp_path_factory.mktemp("demo"))
    env = user_environment(folder.parent / "home")
    return folder, env, run_block("maskray demo --images 12", folder, env, timeout=900)


@pytest.mark.slow
def test_the_demo_and_its_same_as_line(after_make_demo):
    """``make demo`` is ``maskray demo``: it runs from a fresh folder, and the command it says it
    ran is true as printed: run again, it finds its job done."""
    folder, env, said = after_make_demo
    assert "12 images (0 errors)" in said and (folder / "maskray-demo" / "overlay.png").is_file()
    [same_as] = re.findall(r"\(the same as: (maskray segment .*)\)", said)
    again = run_block(same_as, folder, env, timeout=600)
    assert "nothing to do: all 2 shards were already done" in again, again


@pytest.mark.slow
def test_the_ways_out_of_an_output_as_written(after_make_demo):
    """After the demo, the export block and the masks-as-arrays snippet of "Taking results elsewhere",
    run as written from the same folder; pycocotools reads the files back."""
    from pycocotools.coco import COCO

    folder, env, _ = after_make_demo
    said = run_block(readme_block("Taking results elsewhere"), folder, env, timeout=300)
    coco = COCO(str(folder / "coco.json"))
    instances = connect(str(folder / "maskray-demo" / "output")).sql("SELECT count(*) FROM instances").fetchall()[0][0]
    assert len(coco.getAnnIds()) == instances > 0 and f"{instances} annotations" in said
    results = json.loads((folder / "results.json").read_text())
    assert results and all(r["score"] >= 0.5 for r in results) and coco.loadRes(results).getAnnIds()

    section = README.read_text().split("\n## Taking results elsewhere\n")[1]
    [snippet] = [s for s in re.findall(r"```python\n(.*?)```", section, re.DOTALL) if "open_output" in s]
    snippet = "\n".join(line.strip() for line in snippet.splitlines())  # the snippet is indented in its list item
    check = snippet + "\nassert found.masks.shape == (len(found), found.height, found.width) and found.masks.any()\n"
    done = subprocess.run([sys.executable, "-c", check], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

