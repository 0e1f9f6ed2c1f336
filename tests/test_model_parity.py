"""Our Mask R-CNN against torchvision's, the same weights and images: the oracle of the model.

Reference weights: tests/torchvision_reference.py (seeded, calibrated so that rounding does
not decide which boxes survive). Images are small and min_size 320 keeps the tests quick.
"""

import io

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from maskray.model import LOSS_NAMES, MaskRCNN, MaskRCNNConfig
from tests.torchvision_reference import calibrated_state_dict, torchvision_model

SIZES = dict(min_size=320, max_size=512)
SCORE_THRESH = 0.3  # 40-100 detections per image on these weights: many, but under the cap


@pytest.fixture(scope="module")
def weights():
    return calibrated_state_dict(seed=0)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(5)
    return [
        (torch.rand(3, 240, 320, generator=generator) * 255).to(torch.uint8),
        torch.rand(3, 200, 300, generator=generator),
        torch.rand(3, 331, 247, generator=generator),
    ]


def as_float(images):
    return [img.float() / 255 if img.dtype == torch.uint8 else img for img in images]


@pytest.fixture(scope="module")
def torchvision_detections(weights, images):
    reference = torchvision_model(box_score_thresh=SCORE_THRESH, **SIZES)
    reference.load_state_dict(weights)
    with torch.inference_mode():
        return reference.eval()(as_float(images))


def ours(weights, **config):
    model = MaskRCNN(MaskRCNNConfig.resnet50_fpn(box_score_thresh=SCORE_THRESH, min_size=(320,), max_size=512, **config))
    model.load_state_dict(weights)
    return model.eval().to_inference_layout()


def dense_rle(mask_probs):
    """What users of torchvision do: threshold the pasted masks and encode them."""
    binary = (mask_probs[:, 0] > 0.5).numpy().astype(np.uint8)
    encoded = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in encoded]


def decode(rle):
    return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def mismatched_pixels(ours_rle, reference_rle):
    return int((decode(ours_rle) != decode(reference_rle)).sum())


def match_detections(mine, reference, box_tol, score_tol):
    """For each of our detections, the index of the reference one with the same label, box and score."""
    order, used = [], set()
    for i in range(len(mine["boxes"])):
        box_diff = (reference["boxes"] - mine["boxes"][i]).abs().amax(dim=1)
        same = (reference["labels"] == mine["labels"][i]) & (box_diff <= box_tol)
        same &= (reference["scores"] - mine["scores"][i]).abs() <= score_tol
        candidates = [j for j in torch.where(same)[0].tolist() if j not in used]
        assert candidates, f"detection {i} ({mine['labels'][i]}, {mine['boxes'][i].tolist()}) has no counterpart"
        best = min(candidates, key=lambda j: box_diff[j].item())
        used.add(best)
        order.append(best)
    return order


def masks_mostly_agree(ours, reference_probs, share: float = 0.01) -> bool:
    """Our RLE masks against the reference's dense mask probabilities, in aggregate: at most
    ``share`` of their union differs (a box moved by 1e-3 px can move a truncated paste edge by a
    pixel, which on slivers is much of the mask)."""
    mismatched = union = 0
    for a, b in zip(ours, dense_rle(reference_probs)):
        a, b = decode(a), decode(b)
        mismatched += int((a != b).sum())
        union += int((a | b).sum())
    return mismatched <= share * union


def training_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of other sizes, each with two boxes (labels 3 and 17) and masks inside them."""
    generator = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 160, 200, generator=generator), torch.rand(3, 180, 150, generator=generator)]
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [40.0, 30.0, 140.0, 150.0]])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(max=w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(max=h - 1)
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1 + 5 : y2 - 5, x1 + 3 : x2 - 8] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([3, 17]), "masks": masks})
    return images, targets


def test_eval_matches_torchvision_exactly_in_its_layout(weights, images, torchvision_detections):
    """channels_last and BatchNorm folding off: the same float ops as torchvision's."""
    detections = ours(weights, channels_last=False, fold_batchnorm=False)(images)
    total = 0
    for mine, reference in zip(detections, torchvision_detections):
        assert len(mine["boxes"]) == len(reference["boxes"])
        total += len(mine["boxes"])
        torch.testing.assert_close(mine["boxes"], reference["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(mine["scores"], reference["scores"], atol=1e-6, rtol=0)
        assert torch.equal(mine["labels"], reference["labels"])
        # Our mask logits are computed for the detected class only (a dot product instead of
        # the 1x1 conv over all classes): rounding may flip a pixel exactly at the threshold.
        for ours_rle, reference_rle in zip(mine["masks"], dense_rle(reference["masks"])):
            assert ours_rle["size"] == reference_rle["size"]
            assert mismatched_pixels(ours_rle, reference_rle) <= 3
        areas = [int(mask_util.area({"size": r["size"], "counts": r["counts"].encode()})) for r in mine["masks"]]
        assert mine["areas"].tolist() == areas
    assert total >= 60, "too few detections to compare; the reference weights changed?"


def test_eval_fast_path_gives_the_same_detections(weights, images, torchvision_detections):
    """The default config (channels_last, folded BatchNorm) rounds differently, nothing more."""
    detections = ours(weights)(images)
    for mine, reference in zip(detections, torchvision_detections):
        assert len(mine["boxes"]) == len(reference["boxes"])
        # Near-tied scores may swap places, so each detection is matched to its counterpart.
        order = match_detections(mine, reference, box_tol=0.05, score_tol=1e-3)
        reference = {"masks": reference["masks"][order]}
        # A box moved by 1e-3 px can move a truncated paste edge by a pixel: on slivers that is
        # much of the mask, so the masks are compared in aggregate.
        assert masks_mostly_agree(mine["masks"], reference["masks"])


def assert_same_losses_and_gradients(mine, reference, prefixes: tuple[str, ...]) -> set[str]:
    """``mine`` and ``reference`` (the same weights) in train mode on ``training_batch``: the same
    losses, and the same gradients on the parameters whose names start with ``prefixes``, whose
    names are returned."""
    images, targets = training_batch()
    # Both draw their random samples (anchors, proposals) in the same order from torch's generator.
    torch.manual_seed(11)
    expected = reference.train()(images, [dict(t) for t in targets])
    torch.manual_seed(11)
    losses = mine.train()(images, targets)
    assert set(losses) == set(LOSS_NAMES) == set(expected)
    for name in LOSS_NAMES:
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

    # ... and the same gradients reach the weights.
    sum(expected.values()).backward()
    sum(losses.values()).backward()
    reference_parameters = dict(reference.named_parameters())
    checked = set()
    for name, parameter in mine.named_parameters():
        if parameter.grad is not None and name.startswith(prefixes):
            torch.testing.assert_close(parameter.grad, reference_parameters[name].grad, rtol=1e-4, atol=1e-6, msg=name)
            checked.add(name)
    return checked


def test_train_losses_match_torchvision(weights):
    reference = torchvision_model(**SIZES)
    reference.load_state_dict(weights)
    mine = MaskRCNN(MaskRCNNConfig.resnet50_fpn(min_size=(320,), max_size=512))
    mine.load_state_dict(weights)
    assert len(assert_same_losses_and_gradients(mine, reference, ("rpn.", "roi_heads.", "backbone.fpn."))) > 10


def test_from_torchvision_loads_a_saved_checkpoint_in_either_key_layout(weights, images, torchvision_detections, tmp_path):
    path = tmp_path / "maskrcnn.pth"
    torch.save(weights, path)
    model = MaskRCNN.from_torchvision(path)
    assert model.config.num_classes == 91 and model.class_names[1] == "person"
    assert not model.training

    # The public COCO_V1 file predates torchvision 0.12's module names.
    legacy = dict(weights)
    for i in range(1, 5):
        for kind in ("weight", "bias"):
            legacy[f"roi_heads.mask_head.mask_fcn{i}.{kind}"] = legacy.pop(f"roi_heads.mask_head.{i - 1}.0.{kind}")
    for kind in ("weight", "bias"):
        legacy[f"rpn.head.conv.{kind}"] = legacy.pop(f"rpn.head.conv.0.0.{kind}")
    buffer = io.BytesIO()
    torch.save(legacy, buffer)
    buffer.seek(0)
    config = MaskRCNNConfig.resnet50_fpn(box_score_thresh=SCORE_THRESH, min_size=(320,), max_size=512, channels_last=False, fold_batchnorm=False)
    legacy_model = MaskRCNN.from_torchvision(buffer, config=config)
    detections = legacy_model(images)
    for mine, reference in zip(detections, torchvision_detections):
        torch.testing.assert_close(mine["boxes"], reference["boxes"], atol=1e-3, rtol=0)


def test_faster_rcnn_matches_torchvision(weights, images):
    """The mask head switched off: a Faster R-CNN, torchvision's included."""
    box_weights = {k: v for k, v in weights.items() if not k.startswith(("roi_heads.mask_head", "roi_heads.mask_predictor"))}
    reference = torchvision_model(mask=False, box_score_thresh=SCORE_THRESH, **SIZES)
    reference.load_state_dict(box_weights)
    with torch.inference_mode():
        expected = reference.eval()(as_float(images))
    model = MaskRCNN.from_torchvision(box_weights, config=MaskRCNNConfig.resnet50_fpn(
        mask=False, box_score_thresh=SCORE_THRESH, min_size=(320,), max_size=512, channels_last=False, fold_batchnorm=False
    ))
    assert model.roi_heads.mask_head is None
    for mine, reference_detection in zip(model(images), expected):
        assert "masks" not in mine
        torch.testing.assert_close(mine["boxes"], reference_detection["boxes"], atol=1e-3, rtol=0)
        assert torch.equal(mine["labels"], reference_detection["labels"])
