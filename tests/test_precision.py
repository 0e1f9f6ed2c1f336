"""The precision switch (maskray.model.precision): what ``auto`` picks where, and that bfloat16
inference keeps in float32 what decides a result and finds what float32 finds."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskray.model import MaskRCNN, precision
from maskray.pipeline.decode import decode_image
from maskray.pipeline.options import PRECISIONS, check_precision
from maskray.pipeline.train.shapes import make_image

DEMO_MODEL = Path(__file__).resolve().parent.parent / "model" / "weights" / "shapes_light.pt"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them: the oracle of what torch detects."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_the_command_lines_choices_are_the_models():
    assert PRECISIONS == precision.PRECISIONS


def test_every_command_and_the_model_refuse_a_precision_in_one_wording():
    from maskray.pipeline.segment.settings import SegmentJob
    from maskray.pipeline.train.settings import TrainSettings

    wording = "precision must be one of auto, fp32, bf16, fp16, got 'int8'"
    for refuse in (lambda: check_precision("int8"), lambda: precision.resolve("int8", "cpu"),
                   lambda: precision.resolve_for_training("int8", "cpu"),
                   lambda: SegmentJob("in", "out", precision="int8").validate(),
                   lambda: TrainSettings(train_json="x", train_images="y", output="z", precision="int8")):
        with pytest.raises(ValueError, match=re.escape(wording)):
            refuse()
    assert check_precision("bf16") == "bf16"


def test_auto_on_a_cpu_is_bf16_exactly_where_the_cpu_has_it_natively():
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert precision.cpu_has_native_bfloat16() is native
    assert precision.resolve("auto", "cpu") == ("bf16" if native else "fp32")


@pytest.mark.parametrize("asked, cuda_autocast, expected", [
    ("auto", "float16", "fp16"), ("auto", "bfloat16", "bf16"), ("auto", None, "fp32"),
    (None, "float16", "fp16"), ("fp32", "float16", "fp32"), ("bf16", "float16", "bf16"), ("fp16", None, "fp16"),
])
def test_on_a_gpu(asked, cuda_autocast, expected):
    assert precision.resolve(asked, "cuda", cuda_autocast) == expected


def test_explicit_choices_and_the_python_default_on_a_cpu():
    assert [precision.resolve(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert precision.resolve(None, "cpu") == "fp32"  # a model loaded from Python: the float32 the parity tests pin
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'int8'"):
        precision.resolve("int8", "cpu")


def test_training_auto_is_fp16_on_gpus_and_fp32_on_cpus():
    assert precision.resolve_for_training("auto", "cuda") == "fp16"
    assert precision.resolve_for_training("auto", "cpu") == "fp32"
    assert precision.resolve_for_training("bf16", "cpu") == "bf16"


@pytest.fixture(scope="module")
def shapes_images() -> list[torch.Tensor]:
    return [decode_image(make_image(11, i, 320, 240)[0]) for i in range(4)]


def detect(precision_name: str, images: list[torch.Tensor]) -> list[dict]:
    model = MaskRCNN.load(DEMO_MODEL)
    model.config = model.config.replace(precision=precision_name)
    assert model.precision_on("cpu") == precision_name
    return model(images)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return mask_utils.iou([list(x) for x in xywh(a)], [list(x) for x in xywh(b)], [0] * len(b))


def rle(mask: dict) -> dict:
    return {"size": mask["size"], "counts": mask["counts"].encode()}


def xywh(boxes: np.ndarray) -> np.ndarray:
    out = boxes.astype(np.float64).copy()
    out[:, 2:] -= out[:, :2]
    return out


def test_bf16_keeps_results_in_float32_and_finds_what_fp32_finds(shapes_images):
    fp32, bf16 = detect("fp32", shapes_images), detect("bf16", shapes_images)
    matched = confident = 0
    for ours, reference in zip(bf16, fp32):
        # Box decoding, scores and the mask threshold ran in float32.
        assert ours["boxes"].dtype == ours["scores"].dtype == torch.float32
        keep = (reference["scores"] > 0.5).numpy()
        if not keep.any():
            continue
        ref_boxes = reference["boxes"].numpy()[keep]
        confident += int(keep.sum())
        if len(ours["boxes"]) == 0:
            continue
        ious = box_iou(ref_boxes, ours["boxes"].numpy())  # [reference, ours]
        for r, j in enumerate(ious.argmax(axis=1)):
            same_label = int(ours["labels"][j]) == int(reference["labels"][np.where(keep)[0][r]])
            if ious[r, j] > 0.9 and same_label:
                matched += 1
                mask_iou = mask_utils.iou([rle(ours["masks"][j])], [rle(reference["masks"][np.where(keep)[0][r]])], [0])[0, 0]
                assert mask_iou > 0.8
    assert confident >= 4, "the demo model found too little to compare"
    assert matched >= 0.9 * confident
