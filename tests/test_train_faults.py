"""Training and evaluation through storage that throttles, fails, drops connections and cuts
answers short: the loopback S3 server behind the fault-injecting proxy (tests/faults.py), the
same one tests/test_storage_faults.py puts in front of the segmentation job.

- A training run whose every kind of request meets faults (the driver's reads of the COCO JSON
  and listing of the images, the worker's reads of the JSON and every image, the writes of
  settings.json, metrics.csv, metrics.png and model.pt) finishes, and equals an undisturbed run
  of the same seed: the same losses to the last bit, the same validation AP, the same weights.
- An evaluation (``maskray evaluate`` with ``--results`` in the bucket) through the same kinds
  of faults gives the undisturbed evaluation's detections and AP.

The storage client is told not to retry (``total_max_attempts: 1``), so that the answers 500
and the failed listings reach maskray's own retries (``maskray.pipeline.retry.STORAGE_RETRY``):
without them, neither run would finish. s3fs still retries throttling, dropped connections and
bodies cut short itself. The faults are placed by rules with limits, not drawn: each fires
exactly as often as its limit says, so that the counts are exact and the runs never meet more
faults in a row than the retries allow.
"""

import argparse
import io
import json
import re

import pytest
import torch

from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.pipeline.train.coco import CocoDataset
from maskray.pipeline.train.driver import train
from maskray.pipeline.train.metrics import read_metrics
from maskray.pipeline.train.settings import TrainSettings
from maskray.pipeline.train.shapes import write_shapes
from tests.faults import FaultProxy, FaultRule
from tests.services import s3_storage_options
from tests.test_storage import without_waits
from tests.test_train import TINY

pytestmark = pytest.mark.slow

# A fixed bucket name (the server is the session's own): the proxy's rules match request targets.
BUCKET = "maskray-train-faults"
IMAGES = 4  # two steps of two images: enough to move the weights, as little as a Ray Train run allows
SIZE = 64
MODEL_OPTIONS = {**TINY, "min_size": [SIZE], "max_size": SIZE}
LOSS_COLUMNS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
AP_COLUMNS = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")


def data_faults(attempts: int) -> list[FaultRule]:
    """Faults on every kind of read of the data set: the JSON answered 500 as often in a row as
    the retries allow (its first reader, the driver, gets through on the last try), each image
    one kind of fault on its first reads, the listing of the images throttled and failing."""
    data = rf"^/{BUCKET}/data/"
    return [
        FaultRule("500", method="GET", target=data + r"annotations\.json", limit=attempts - 1),
        FaultRule("cut", method="GET", target=data + r"images/000000\.png", limit=2),
        FaultRule("drop", method="GET", target=data + r"images/000001\.png", limit=2),
        FaultRule("503", method="GET", target=data + r"images/000002\.png", limit=2),
        FaultRule("500", method="GET", target=data + r"images/000003\.png", limit=1),
        FaultRule("503", method="GET", target=r"prefix=data/images", limit=1),
        FaultRule("500", method="GET", target=r"prefix=data/images", limit=1),
    ]


def write_faults(output: str, files: dict[str, str]) -> list[FaultRule]:
    """One fault on the first PUT of each of ``files`` ({name: kind}) in ``output``: a multipart
    upload's requests are matched too (the name is followed by its query)."""
    return [FaultRule(kind, method="PUT", target=f"^/{BUCKET}/{output}/{re.escape(name)}", limit=1)
            for name, kind in files.items()]


def expected_counts(rules: list[FaultRule]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rule in rules:
        counts[rule.kind] = counts.get(rule.kind, 0) + (rule.limit or 1)
    return counts


def through(proxy: FaultProxy) -> dict:
    """Storage options that reach the server through ``proxy``, the client's retries off."""
    return {**s3_storage_options(proxy.endpoint), "config_kwargs": {"retries": {"total_max_attempts": 1}}}


@pytest.fixture(scope="module")
def direct(s3_server) -> dict:
    return s3_storage_options(s3_server)


@pytest.fixture(scope="module")
def dataset(direct) -> str:
    """A tiny shapes set in the bucket; returns its URL."""
    import s3fs

    s3fs.S3FileSystem(**direct).call_s3("create_bucket", Bucket=BUCKET)
    write_shapes(f"s3://{BUCKET}/data", IMAGES, seed=3, size=(SIZE, SIZE), storage_options=direct)
    return f"s3://{BUCKET}/data"


@pytest.fixture
def no_waits(monkeypatch) -> int:
    """The retries of this process (the drivers') without their waits; the Ray Train worker, a
    process of its own, keeps the real policy (waits of a second or two)."""
    return without_waits(monkeypatch)


def training(dataset: str, output: str, options: dict) -> TrainSettings:
    coco, images = f"{dataset}/annotations.json", f"{dataset}/images"
    return TrainSettings(
        train_json=coco, train_images=images, val_json=coco, val_images=images, output=f"s3://{BUCKET}/{output}",
        workers=1, cpus_per_worker=1, epochs=1, batch_size=2, warmup_iters=1, model_options=MODEL_OPTIONS,
        progress=False, storage_options=options)


def load_model(url: str, options: dict) -> MaskRCNN:
    import s3fs

    with s3fs.S3FileSystem(**options).open(url, "rb") as f:
        return MaskRCNN.load(f)


def test_training_through_faults_equals_an_undisturbed_run(ray_local, dataset, direct, no_waits):
    reference = train(training(dataset, "reference", direct), log=lambda _: None)

    rules = data_faults(no_waits) + write_faults("faulty", {"settings.json": "503", "metrics.csv": "500",
                                                            "metrics.png": "drop", "model.pt": "500"})
    with FaultProxy(direct["client_kwargs"]["endpoint_url"], rules) as proxy:
        faulty = train(training(dataset, "faulty", through(proxy)), log=lambda _: None)
    # Every rule fired as often as its limit: each kind of fault met the reads and the writes.
    assert proxy.counts() == expected_counts(rules)
    assert proxy.counts("PUT") == {"503": 1, "500": 2, "drop": 1}
    assert proxy.counts(target=r"annotations\.json") == {"500": no_waits - 1}

    assert faulty["step"] == reference["step"] == IMAGES // 2
    ours, theirs = read_metrics(f"s3://{BUCKET}/faulty", direct), read_metrics(f"s3://{BUCKET}/reference", direct)
    assert len(ours) == len(theirs) == 1
    # Exactly, as written (repr of the float): the same seed, data and single-threaded CPU
    # arithmetic in the same order give the same bits; an image read twice or cut short would not.
    assert [{k: row[k] for k in LOSS_COLUMNS + AP_COLUMNS} for row in ours] == \
        [{k: row[k] for k in LOSS_COLUMNS + AP_COLUMNS} for row in theirs]
    assert float(ours[0]["loss"]) > 0
    # The same weights, written whole through the faults.
    ours, theirs = load_model(faulty["model"], direct).state_dict(), load_model(reference["model"], direct).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_evaluation_through_faults_equals_an_undisturbed_one(dataset, direct, no_waits, capsys):
    import s3fs

    from maskray.jobs import evaluate

    # An untrained model scores every class about alike, above the score threshold: many detections to compare.
    class_names = CocoDataset(f"{dataset}/annotations.json", f"{dataset}/images", direct, check_files=False).class_names
    torch.manual_seed(0)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in MODEL_OPTIONS.items()}
    buffer = io.BytesIO()
    MaskRCNN(MaskRCNNConfig.light(len(class_names), class_names, **options)).save(buffer)
    fs = s3fs.S3FileSystem(**direct)
    fs.pipe_file(f"{BUCKET}/eval/model.pt", buffer.getvalue())

    def run(output: str, options: dict) -> list[str]:
        parser = argparse.ArgumentParser()
        evaluate.add_arguments(parser)
        args = parser.parse_args(["--weights", f"s3://{BUCKET}/eval/model.pt", "--json", f"{dataset}/annotations.json",
                                  "--images", f"{dataset}/images", "--results", f"s3://{BUCKET}/{output}/results.json",
                                  "--no-progress", "--storage-options", json.dumps(options)])
        capsys.readouterr()
        assert evaluate.run(args) == 0, capsys.readouterr().err
        return [line for line in capsys.readouterr().out.splitlines() if "s3://" not in line]  # the AP table

    undisturbed = run("eval-reference", direct)
    rules = data_faults(no_waits) + write_faults("eval-faulty", {"results.json": "500"})
    with FaultProxy(direct["client_kwargs"]["endpoint_url"], rules) as proxy:
        disturbed = run("eval-faulty", through(proxy))
    assert proxy.counts() == expected_counts(rules)

    assert disturbed == undisturbed and len(disturbed) == 3  # header, bbox and segm rows
    ours, theirs = (json.loads(fs.cat_file(f"{BUCKET}/{o}/results.json")) for o in ("eval-faulty", "eval-reference"))
    assert len(ours) > 0 and ours == theirs
