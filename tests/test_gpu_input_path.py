"""The GPU input path's logic, run on the CPU: an out-of-memory batch is split in halves and
retried, never dropped to one image at a time for the rest of the shard; JPEGs are decoded on
the device a batch at a time (here ``device="cpu"``: the same torchvision call through libjpeg),
with Pillow for the other formats, EXIF rotation, cut or refused files, and the same error row
as Pillow's path; batch n+1 is prepared while the model runs batch n, in order, nothing lost."""

import hashlib
import io
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from maskray.model.config import MaskRCNNConfig
from maskray.model.mask_rcnn import MaskRCNN
from maskray.pipeline import gpu_decode
from maskray.pipeline.decode import ImageDecodeError, decode_image
from maskray.pipeline.segment import worker as worker_module
from maskray.pipeline.segment.plan import Shard
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.weights import Weights

# torchvision 0.29 warns on every decode_jpeg that TorchCodec supersedes it (filtered in gpu_decode; pytest shows it again).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

FITS = 2  # the largest batch the injected "device" holds


def light_weights(folder) -> Weights:
    """An untrained light model of small inputs, saved in ``folder`` and read back."""
    torch.manual_seed(0)
    config = MaskRCNNConfig.light(num_classes=3, class_names=("__background__", "a", "b"), min_size=(96,), max_size=128, box_detections_per_img=5)
    path = folder / "light.pt"
    MaskRCNN(config).save(path)
    data = path.read_bytes()
    return Weights("w", hashlib.sha256(data).hexdigest(), data)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Weights:
    return light_weights(tmp_path_factory.mktemp("weights"))


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class _SmallDevice:
    """Wraps the model; raises torch.OutOfMemoryError for a batch larger than ``fits`` and records batch sizes."""

    def __init__(self, model, fits: int):
        self.model, self.fits, self.calls = model, fits, []

    def __getattr__(self, name):  # precision_on, config, ...: the model's
        return getattr(self.model, name)

    def __call__(self, images):
        self.calls.append(len(images))
        if len(images) > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {len(images)} images")
        return self.model(images)


def _run(weights, tmp_path, files: int, batch_size: int, fits: int):
    folder = tmp_path / "in"
    folder.mkdir()
    uris = []
    for i in range(files):
        (folder / f"{i}.png").write_bytes(_png(i))
        uris.append(str(folder / f"{i}.png"))
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out"), options=worker_module.WorkerOptions(batch_size=batch_size),
                                       device="cpu")
    device = _SmallDevice(worker.model, fits)
    worker.model = device
    try:
        worker.process(Shard(0, 0, tuple(uris)))
    finally:
        worker.close()
    images = pq.read_table(next((tmp_path / "out").rglob("images/*.parquet"))).to_pylist()
    return device.calls, sorted(images, key=lambda row: row["image_id"])


def test_out_of_memory_batch_is_halved_recursively_and_later_batches_stay_full(weights, tmp_path):
    calls, images = _run(weights, tmp_path, files=16, batch_size=8, fits=FITS)
    # Each batch of 8: 8 fails, 4 fails, then 2+2, 4 fails, 2+2. The second batch starts at 8 again.
    per_batch = [8, 4, 2, 2, 4, 2, 2]
    assert calls == per_batch * 2
    assert [row["status"] for row in images] == ["ok"] * 16


def test_image_that_does_not_fit_alone_is_its_error_row(weights, tmp_path):
    calls, images = _run(weights, tmp_path, files=3, batch_size=2, fits=0)
    assert calls == [2, 1, 1, 1]
    assert [row["status"] for row in images] == ["error"] * 3
    assert all(row["error"].startswith("model failed: OutOfMemoryError: CUDA out of memory") for row in images)


def test_batch_size_for_a_gpu_follows_free_memory_and_stays_in_bounds():
    cuda, pixels = torch.device("cuda"), 800 * 1333
    per_image = worker_module.GPU_BYTES_PER_PIXEL * pixels / worker_module.GPU_MEMORY_SHARE
    assert worker_module.choose_batch_size(cuda, pixels, free_bytes=int(per_image * 5.5)) == 5
    assert worker_module.choose_batch_size(cuda, pixels, free_bytes=int(per_image * 0.5)) == 1
    assert worker_module.choose_batch_size(cuda, pixels, free_bytes=int(per_image * 1000)) == worker_module.MAX_GPU_BATCH_SIZE
    assert worker_module.choose_batch_size(torch.device("cpu"), pixels) == worker_module.CPU_BATCH_SIZE


def test_unset_batch_size_is_chosen_for_the_device(weights, tmp_path):
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out"), options=worker_module.WorkerOptions(batch_size=None),
                                       device="cpu")
    try:
        assert worker.batch_size == worker_module.CPU_BATCH_SIZE
    finally:
        worker.close()
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        worker_module.WorkerOptions(batch_size=0)


def test_segment_job_leaves_the_batch_size_to_the_device_by_default():
    job = SegmentJob("in", "out", "./w.pt")
    assert job.batch_size is None
    job.validate()
    assert job.worker_options().batch_size is None
    assert SegmentJob("in", "out", "./w.pt", batch_size=4).worker_options().batch_size == 4


# decoding on the device -------------------------------------------------------------------

def _pixels(height=48, width=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.kron(coarse, np.ones((8, 8, 1), np.uint8))  # blocks: JPEG keeps them close


def _jpeg(pixels=None, **params) -> bytes:
    image = Image.fromarray(_pixels() if pixels is None else pixels)
    if "mode" in params:
        image = image.convert(params.pop("mode"))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=params.pop("quality", 90), **params)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("make, expected", [
    (lambda: _jpeg(), True),
    (lambda: _jpeg(progressive=True), True),
    (lambda: _jpeg(mode="L"), True),
    (lambda: _jpeg(exif=_exif(1)), True),
    (lambda: _jpeg(subsampling=0), True),
    (lambda: _jpeg(exif=_exif(6)), False),
    (lambda: _jpeg(exif=_exif(3)), False),
    (lambda: _jpeg(xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'), False),
    (lambda: _jpeg(mode="CMYK"), False),
    (lambda: _jpeg()[:-300], False),
    (lambda: _jpeg()[:100], False),
    (lambda: _png(0), False),
    (lambda: b"", False),
    (lambda: b"<html>not found</html>", False),
], ids=["baseline", "progressive", "gray", "exif_upright", "444", "exif_rotated", "exif_upside_down", "xmp_rotated",
        "cmyk", "truncated", "cut_in_header", "png", "empty", "html"])
def test_which_files_the_device_decodes(make, expected):
    assert gpu_decode.device_decodable(make()) is expected


def test_over_the_pixel_limit_stays_with_pillow():
    data = _jpeg()  # 64 x 48
    assert gpu_decode.device_decodable(data, max_pixels=64 * 48)
    assert not gpu_decode.device_decodable(data, max_pixels=64 * 48 - 1)


def test_header_says_size_and_orientation():
    header = gpu_decode.read_jpeg_header(_jpeg(_pixels(40, 72), exif=_exif(8), progressive=True))
    assert (header.height, header.width, header.components, header.sof, header.orientation) == (40, 72, 3, 0xC2, 8)
    big_endian = b"MM\x00*\x00\x00\x00\x08\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x05\x00\x00"
    assert gpu_decode._exif_orientation(memoryview(big_endian + b"\x00" * 4)) == 5
    assert gpu_decode._exif_orientation(memoryview(b"garbage!")) is None


def test_batch_decodes_on_the_device_as_pillow_does():
    datas = [_jpeg(_pixels(48, 64, seed)) for seed in range(3)] + [_jpeg(mode="L"), _jpeg(progressive=True)]
    decoded = gpu_decode.decode_batch(datas, "cpu")
    for data, image in zip(datas, decoded):
        expected = decode_image(data)
        assert image.dtype == torch.uint8 and image.shape == expected.shape and image.device.type == "cpu"
        assert (image.int() - expected.int()).abs().max() <= 1  # libjpeg-turbo both; nvJPEG may round by one


def test_a_file_the_device_refuses_goes_to_pillow(monkeypatch):
    import torchvision.io

    real, calls = torchvision.io.decode_jpeg, []
    refused = _jpeg(_pixels(seed=7))

    def picky(inputs, mode, device):
        calls.append(len(inputs))
        if any(bytes(t.numpy()) == refused for t in inputs):
            raise RuntimeError("nvjpeg: unsupported JPEG")  # what torchvision raises for a stream nvJPEG refuses
        return real(inputs, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    datas = [_jpeg(_pixels(seed=1)), refused, _jpeg(_pixels(seed=2))]
    decoded = gpu_decode.decode_batch(datas, "cpu")
    assert calls == [3, 1, 1, 1]  # the batch, then each on its own
    assert all(torch.equal(image, decode_image(data)) or (image.int() - decode_image(data).int()).abs().max() <= 1
               for image, data in zip(decoded, datas))
    assert torch.equal(decoded[1], decode_image(refused))  # Pillow's own pixels


def test_device_failure_is_not_hidden_behind_pillow(monkeypatch):
    import torchvision.io

    def broken(inputs, mode, device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    with pytest.raises(RuntimeError, match="CUDA error"):
        gpu_decode.decode_batch([_jpeg()], "cpu")


def _cut_in_scan(data: bytes) -> bytes:
    """``data`` cut short in its image data, with an end marker added: it passes the header check
    (and Pillow, like libjpeg, decodes it, the missing rows grey)."""
    return data[: data.index(b"\xff\xda") + 60] + b"\xff\xd9"


def _without_tables(data: bytes, marker: int = 0xDB) -> bytes:
    """``data`` without its quantisation tables: the header parses, no decoder can decode it."""
    out, pos = bytearray(data[:2]), 2
    while data[pos + 1] != 0xDA:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] != marker:
            out += data[pos : pos + 2 + length]
        pos += 2 + length
    return bytes(out + data[pos:])


def test_broken_jpeg_gets_pillows_error_text():
    broken = _without_tables(_jpeg())
    assert gpu_decode.device_decodable(broken)
    with pytest.raises(ImageDecodeError) as pillow:
        decode_image(broken)
    [error] = gpu_decode.decode_batch([broken], "cpu")
    assert isinstance(error, ImageDecodeError) and str(error) == str(pillow.value)


# the worker with the device's decoder, and the overlap --------------------------------------

def _corpus(folder) -> list[str]:
    """Files of every kind, in the order of the shard."""
    rotated = Image.fromarray(_pixels(40, 72, 5))
    buffer = io.BytesIO()
    rotated.save(buffer, "JPEG", exif=_exif(6))
    files = {
        "0.jpg": _jpeg(_pixels(seed=0)), "1.png": _png(1), "2.jpg": buffer.getvalue(), "3.jpg": _jpeg()[:-300],
        "4.jpg": _jpeg(mode="L"), "5.jpg": _jpeg(_pixels(seed=5), progressive=True), "6.txt.jpg": b"<html>gone</html>",
        "7.jpg": _without_tables(_jpeg()), "8.jpg": _jpeg(_pixels(seed=8)), "9.jpg": _jpeg(mode="CMYK"),
        "10.jpg": _jpeg(_pixels(seed=10)), "11.jpg": _cut_in_scan(_jpeg(_pixels(seed=11))),
    }
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in files] + [str(folder / "missing.jpg")]


def _rows(weights, tmp_path, name, uris, **options):
    worker = worker_module.ShardWorker(weights, str(tmp_path / name), options=worker_module.WorkerOptions(**options), device="cpu")
    try:
        summary = worker.process(Shard(0, 0, tuple(uris)))
    finally:
        worker.close()
    table = pq.read_table(next((tmp_path / name).rglob("images/*.parquet"))).to_pylist()
    instances = pq.read_table(next((tmp_path / name).rglob("instances/*.parquet"))).to_pylist()
    return summary, table, instances


def test_worker_decoding_on_the_device_gives_the_rows_of_pillows_path(weights, tmp_path, monkeypatch):
    uris = _corpus(tmp_path / "in")
    on_device = []
    real = gpu_decode.decode_batch
    monkeypatch.setattr(gpu_decode, "decode_batch", lambda datas, *a, **k: on_device.append(len(datas)) or real(datas, *a, **k))
    summary, device_rows, device_instances = _rows(weights, tmp_path, "device", uris, batch_size=3, jpeg_decoder="device")
    assert sum(on_device) == 7  # 0, 4, 5, 7, 8, 10, 11: the rest (PNG, EXIF, cut, HTML, CMYK, missing) never reach it
    _, pillow_rows, pillow_instances = _rows(weights, tmp_path, "pillow", uris, batch_size=3, jpeg_decoder="pillow")
    _, libjpeg_rows, libjpeg_instances = _rows(weights, tmp_path, "libjpeg", uris, batch_size=3, jpeg_decoder="libjpeg")
    # libjpeg on the host: Pillow's pixels, so the same rows in the same order and the same instances.
    assert libjpeg_rows == pillow_rows and libjpeg_instances == pillow_instances
    assert summary["images"] == len(uris) and summary["errors"] == 4  # 3 (cut), 6 (HTML), 7 (no tables), missing
    # Every image once, with the status, size and error of Pillow's path. (The rows' order may
    # differ: a file that only the device's decoder finds broken leaves its batch one short.)
    assert sorted(row["image_uri"] for row in device_rows) == sorted(row["image_uri"] for row in pillow_rows) == sorted(uris)
    expected = {row["image_uri"]: row for row in pillow_rows}
    for got in device_rows:
        assert {k: got[k] for k in ("status", "error", "width", "height")} == \
               {k: expected[got["image_uri"]][k] for k in ("status", "error", "width", "height")}, got["image_uri"]
    by_uri = {row["image_uri"]: row for row in device_rows}
    assert (by_uri[uris[2]]["width"], by_uri[uris[2]]["height"]) == (40, 72)  # EXIF rotation applied (by Pillow)
    assert by_uri[uris[3]]["status"] == by_uri[uris[7]]["status"] == "error"
    assert by_uri[uris[9]]["status"] == "ok"  # CMYK, by Pillow
    assert len(device_instances) == len(pillow_instances)


def test_device_decoding_is_the_default_on_a_gpu_libjpeg_on_a_cpu(weights, tmp_path):
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out"), device="cpu")
    try:
        assert worker.jpeg_decoder == "libjpeg" and worker.batch_size == worker_module.CPU_BATCH_SIZE
    finally:
        worker.close()
    with pytest.raises(ValueError, match="jpeg_decoder must be"):
        worker_module.WorkerOptions(jpeg_decoder="nvjpeg")


class _SlowModel:
    """Wraps the model; each call takes ``seconds`` more and records when, and on which thread, it ran."""

    def __init__(self, model, events, seconds):
        self.model, self.events, self.seconds = model, events, seconds

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, images):
        self.events.append(("thread", threading.current_thread().name))
        self.events.append(("model", len(images)))
        time.sleep(self.seconds)
        result = self.model(images)
        self.events.append(("model done", len(images)))
        return result


def _jpeg_files(folder, count: int) -> list[str]:
    folder.mkdir()
    for i in range(count):
        (folder / f"{i}.jpg").write_bytes(_jpeg(_pixels(seed=i)))
    return [str(folder / f"{i}.jpg") for i in range(count)]


def test_next_batch_is_prepared_while_the_model_runs(weights, tmp_path):
    uris = _jpeg_files(tmp_path / "in", 8)
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out"), device="cpu",
                                       options=worker_module.WorkerOptions(batch_size=2, jpeg_decoder="device"))
    events = []
    worker.model = _SlowModel(worker.model, events, 0.3)
    prepare = worker._on_device

    def recorded(batch):
        for step in prepare(batch):
            events.append(("prepared", threading.current_thread().name))
            yield step

    worker._on_device = recorded
    try:
        worker.process(Shard(0, 0, tuple(uris)))
    finally:
        worker.close()
    kinds = [kind for kind, _ in events]
    assert kinds.count("model") == 4 and kinds.count("prepared") == 4
    assert {name for kind, name in events if kind == "prepared"} == {"maskray-prepare"}
    # Batch n+1 was ready before batch n's model call ended (the model sleeps 0.3 s a call).
    for n in range(3):
        model_done = [i for i, kind in enumerate(kinds) if kind == "model done"][n]
        next_prepared = [i for i, kind in enumerate(kinds) if kind == "prepared"][n + 1]
        assert next_prepared < model_done, events
    rows = pq.read_table(next((tmp_path / "out").rglob("images/*.parquet"))).to_pylist()
    assert [row["image_uri"] for row in rows] == uris and all(row["status"] == "ok" for row in rows)


def test_two_shards_at_once_read_ahead_and_take_turns_at_the_model(weights, tmp_path):
    """The actor calls process for two shards at once: the later one's reads start while the
    earlier is in the model, the model runs one shard's batches after the other's on one thread,
    and a shard that fails passes the turn on."""
    uris = _jpeg_files(tmp_path / "in", 8)
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out"), device="cpu",
                                       options=worker_module.WorkerOptions(batch_size=2))
    events = []
    worker.model = _SlowModel(worker.model, events, 0.2)
    read = worker.load

    def recorded_load(uri, image_id, *args):
        events.append(("read", image_id))
        return read(uri, image_id, *args)

    worker.load = recorded_load
    first, second = Shard(0, 0, tuple(uris[:4])), Shard(1, 4, tuple(uris[4:]))
    unreadable = Shard(2, 8, ("nosuchprotocol://bucket/x.jpg",))
    summaries = {}

    def run(shard):
        summaries[shard.index] = worker.process(shard)

    try:
        a = threading.Thread(target=run, args=(first,))
        a.start()
        while ("model", 2) not in events:  # the first shard is in the model
            time.sleep(0.01)
        b = threading.Thread(target=run, args=(second,))
        b.start()
        a.join(30)
        b.join(30)
    finally:
        worker.close()
    assert summaries[0]["images"] == summaries[1]["images"] == 4
    assert {name for kind, name in events if kind == "thread"} == {"maskray-infer_0"}
    kinds = [kind for kind, _ in events]
    model_done = [i for i, kind in enumerate(kinds) if kind == "model done"]
    assert len(model_done) == 4
    # The second shard's first read came before the first shard's last model call ended...
    assert events.index(("read", 4)) < model_done[1], events
    # ...and its first model call after it: the first shard's batches ran, then the second's.
    model_calls = [i for i, kind in enumerate(kinds) if kind == "model"]
    assert model_calls[2] > model_done[1]
    rows = [row for path in (tmp_path / "out").rglob("images/*.parquet") for row in pq.read_table(path).to_pylist()]
    assert sorted(row["image_uri"] for row in rows) == sorted(uris)

    # A shard that fails (its storage cannot be read) hands its turn on to the next.
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out2"), device="cpu",
                                       options=worker_module.WorkerOptions(batch_size=2))
    try:
        with pytest.raises(worker_module.ShardReadError):
            worker.process(unreadable)
        assert worker.process(second)["images"] == 4
    finally:
        worker.close()


def test_ahead_keeps_order_raises_in_place_and_stops_early():
    assert list(worker_module._Ahead(iter(range(50)), depth=1)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise worker_module.ShardReadError("storage kept failing")

    steps = iter(worker_module._Ahead(failing(), depth=1))
    assert (next(steps), next(steps)) == (1, 2)
    with pytest.raises(worker_module.ShardReadError, match="storage kept failing"):
        next(steps)

    produced, closed = [], threading.Event()

    def endless():
        try:
            for i in range(10**9):
                produced.append(i)
                yield i
        finally:
            closed.set()

    ahead = worker_module._Ahead(endless(), depth=1)
    assert next(iter(ahead)) == 0
    ahead.close()  # the consumer stopped (its model call raised): the thread stops too
    assert closed.wait(5) and len(produced) <= 4

    # It starts working when made, before anyone asks (a shard's reads begin while the shard
    # before it is in the model), and one closed without ever being read stops too.
    produced, closed = [], threading.Event()
    ahead = worker_module._Ahead(endless(), depth=1)
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(produced) >= 2
    ahead.close()
    assert closed.wait(5)


# on a GPU (skipped without one; make gpu-check runs them) ------------------------------------

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@requires_gpu
def test_nvjpeg_decodes_a_batch_close_to_pillow():
    datas = [_jpeg(_pixels(48, 64, seed)) for seed in range(4)] + [_jpeg(mode="L"), _jpeg(progressive=True),
                                                                    _jpeg(subsampling=0)]
    decoded = gpu_decode.decode_batch(datas, "cuda")
    for data, image in zip(datas, decoded):
        expected = decode_image(data)
        assert image.device.type == "cuda" and image.dtype == torch.uint8 and image.shape == expected.shape
        difference = (image.cpu().float() - expected.float()).abs()
        assert difference.mean() < 2  # nvJPEG's IDCT and upsampling round differently (torchvision's own bound)


@pytest.mark.cuda
@requires_gpu
def test_nvjpeg_refusal_and_broken_files_on_a_gpu():
    broken, good = _without_tables(_jpeg()), _jpeg(_pixels(seed=3))
    with pytest.raises(ImageDecodeError) as pillow:
        decode_image(broken)
    first, second = gpu_decode.decode_batch([good, broken], "cuda")
    assert first.device.type == "cuda" and first.shape == (3, 48, 64)
    assert isinstance(second, ImageDecodeError) and str(second) == str(pillow.value)


@pytest.mark.cuda
@requires_gpu
def test_worker_on_a_gpu_gives_the_rows_of_the_cpu_path(weights, tmp_path):
    uris = _corpus(tmp_path / "in")
    worker = worker_module.ShardWorker(weights, str(tmp_path / "gpu"), options=worker_module.WorkerOptions(batch_size=3),
                                       device="cuda")
    try:
        assert worker.jpeg_decoder == "device" and worker._copy_stream is not None
        summary = worker.process(Shard(0, 0, tuple(uris)))
    finally:
        worker.close()
    rows = pq.read_table(next((tmp_path / "gpu").rglob("images/*.parquet"))).to_pylist()
    _, cpu_rows, _ = _rows(weights, tmp_path, "cpu", uris, batch_size=3, jpeg_decoder="pillow")
    assert summary["images"] == len(uris) and sorted(r["image_uri"] for r in rows) == sorted(uris)
    expected = {row["image_uri"]: row for row in cpu_rows}
    for got in rows:
        assert {k: got[k] for k in ("status", "error", "width", "height")} == \
               {k: expected[got["image_uri"]][k] for k in ("status", "error", "width", "height")}, got["image_uri"]


# bench/gpu_check.py: what runs without a GPU ------------------------------------------------

def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_says_it_needs_a_gpu_and_fails(capsys):
    assert _gpu_check().main([]) == 2
    assert "gpu-check needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_check_report_is_a_benchmarks_table():
    check = _gpu_check()
    args = check.parse(["--archs", "v1", "--precisions", "fp16", "--batch-sizes", "1", "16", "--job-batch-sizes", "16"])
    mib = 2**20
    rows = [{"arch": "v1", "precision": "fp16", "batch": 1, "loop_images_per_s": 20.0, "loop_peak_bytes": 1000 * mib,
             "detections_per_image": 100},
            {"arch": "v1", "precision": "fp16", "batch": 16, "loop_images_per_s": 80.0, "loop_peak_bytes": 4000 * mib,
             "detections_per_image": 100, "job_images_per_s": 72.0, "job_peak_bytes": 5000 * mib, "job_end_to_end_s": 12.0}]
    steps = {"build": {"ok": True, "what": "built for sm_90 in 80 s"}, "tests": {"ok": True, "what": "120 passed"}}
    text = check.report("NVIDIA H200", steps, {"model": rows, "roi_ops": [], "skipped": [], "auto_batch": 16}, args)
    assert "**Measured on NVIDIA H200**" in text and "- build: ok, built for sm_90 in 80 s" in text
    assert "| v1 | fp16 | 1 | 20.00 | 1000 | — | — | — |" in text
    assert "| v1 | fp16 | 16 | 80.00 | 4000 | 72.00 | 0.90 | 5000 |" in text
    assert f"{3000 * mib / 15 / (800 * 1200):.0f} bytes per input pixel" in text


def test_cpu_decoding_takes_turns_earliest_image_first():
    turns, order = worker_module._InOrder(), []
    holder_in, release = threading.Event(), threading.Event()

    def hold():
        with turns.turn(0):
            holder_in.set()
            release.wait(5)

    def take(number):
        with turns.turn(number):
            order.append(number)

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    assert holder_in.wait(5)
    for number in (5, 3, 4, 1, 2):
        threads.append(threading.Thread(target=take, args=(number,)))
        threads[-1].start()
    time.sleep(0.2)  # all five wait for the holder
    assert order == []
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == [1, 2, 3, 4, 5]
