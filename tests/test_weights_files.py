"""A wrong file given as weights (``--weights`` of segment and evaluate, ``--init`` of train) is
answered with one line that names the flag and the file and says what the file is: an image, a
text or HTML page, an empty or truncated download, a whole pickled model, another model's state
dict, a checkpoint that does not fit its config. Never torch's multi-line text, its terminal
colour codes, or its advice to load the file with weights_only off."""

import io
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from maskray.jobs import cli
from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.pipeline.weights import build_model, read_weights

MASKRAY = Path(sys.executable).parent / "maskray"


def light_model() -> MaskRCNN:
    return MaskRCNN(MaskRCNNConfig.light(num_classes=3, min_size=(64,), max_size=64))


def image(kind: str):
    def write(path: Path) -> None:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format=kind)
    return write


def truncated_checkpoint(path: Path) -> None:
    light_model().save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def misfit_checkpoint(path: Path) -> None:
    """A maskray checkpoint whose weights do not fit its config: a key gone, one added, one reshaped."""
    buffer = io.BytesIO()
    light_model().save(buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    weights = state["state_dict"]
    del weights["backbone.body.conv1.weight"]
    weights["extra.weight"] = torch.zeros(1)
    weights["backbone.body.bn1.weight"] = torch.zeros(7)
    torch.save(state, path)


def fasterrcnn_like(path: Path) -> None:
    """The two keys every torchvision Mask R-CNN has, and none of the rest."""
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
                "roi_heads.box_predictor.cls_score.weight": torch.zeros(5, 1024)}, path)


def keypoint_like(path: Path) -> None:
    state = {"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
             "roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 1024),
             "roi_heads.keypoint_predictor.kps_score_lowres.weight": torch.zeros(512, 17, 4, 4)}
    torch.save(state, path)


def not_a_torch_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


def safetensors_like(path: Path) -> None:
    header = b'{"__metadata__":{}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))


# name -> (how to write it, what the line must say after "--weights PATH: ")
BAD_FILES = {
    "cat.jpg": (image("JPEG"), "not a loadable weights file: a JPEG image"),
    "cat.png": (image("PNG"), "not a loadable weights file: a PNG image"),
    "cat.webp": (image("WEBP"), "not a loadable weights file: a WebP image"),
    "notes.pt": (lambda p: p.write_text("model weights go here\n"),
                 "not a loadable weights file: a text file starting 'model weights go here'"),
    "error.pt": (lambda p: p.write_text("<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>"
                                        "<body><h1>Forbidden</h1>" + "<p>You do not have access.</p>" * 40),
                 "not a loadable weights file: a text file, an HTML page starting '<!DOCTYPE html> <html><head>"),
    "lfs.pt": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"),
               "not a loadable weights file: a Git LFS pointer"),
    "empty.pt": (lambda p: p.write_bytes(b""), "not a loadable weights file: an empty file (0 bytes)"),
    "truncated.pt": (truncated_checkpoint, "not a loadable weights file: a truncated or damaged torch file"),
    "resnet18-model.pt": (lambda p: torch.save(torchvision.models.resnet18(weights=None), p),
                          ("not a loadable weights file: a whole pickled model (ResNet object); save its "
                           "state_dict() instead: torch.save(model.state_dict(), path)")),
    "old-format-model.pt": (lambda p: torch.save(torchvision.models.resnet18(weights=None), p,
                                                 _use_new_zipfile_serialization=False),
                            "not a loadable weights file: a whole pickled model (ResNet object)"),
    "maskray-model.pt": (lambda p: torch.save(light_model(), p),
                         ("not a loadable weights file: a whole pickled model (MaskRCNN object); save it with "
                          "model.save(path) instead")),
    "pickled.pkl": (lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=4)),
                    "not a loadable weights file: a Python pickle that pickle.dump wrote, not torch.save"),
    "archive.zip": (not_a_torch_zip, ("not a loadable weights file: a zip archive that is not a torch file "
                                      "(it holds readme.txt)")),
    "model.safetensors": (safetensors_like, "not a loadable weights file: a safetensors file"),
    "resnet18.pth": (lambda p: torch.save(torchvision.models.resnet18(weights=None).state_dict(), p),
                     ("not a torchvision maskrcnn_resnet50_fpn state dict: 122 tensors, without "
                      "backbone.body.conv1.weight, ...; looks like an image classifier (fc.weight [1000, 512])")),
    "keypoints.pth": (keypoint_like, ("not a torchvision maskrcnn_resnet50_fpn state dict: 3 tensors; looks like "
                                      "a Keypoint R-CNN (roi_heads.keypoint_predictor")),
    "ddp.pth": (lambda p: torch.save({f"module.{k}": v for k, v in light_model().state_dict().items()}, p),
                ("not a torchvision maskrcnn_resnet50_fpn state dict: 142 tensors, without backbone.body.conv1.weight"
                 ", ...; looks like a DataParallel-wrapped model")),
    "lightning.ckpt": (lambda p: torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(1)}}, p),
                       ("not a torchvision maskrcnn_resnet50_fpn state dict: a dict of 2 entries without tensors "
                        "(epoch, state_dict); a training checkpoint?")),
    "misfit.pt": (misfit_checkpoint, ("its state_dict does not fit its config: 1 missing "
                                      "(backbone.body.conv1.weight); 1 unexpected (extra.weight); 1 of another "
                                      "shape (backbone.body.bn1.weight [7], the model's [64])")),
}


def assert_one_plain_line(message: str, label: str) -> None:
    assert "\n" not in message.strip() and "\x1b" not in message and "Traceback" not in message, message
    assert "weights_only" not in message and "add_safe_globals" not in message, message
    assert len(message.removeprefix(label)) < 260, message


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_weights_file_is_said_for_what_it_is(name, tmp_path):
    write, says = BAD_FILES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as refused:
        build_model(read_weights(str(path)))
    message = str(refused.value)
    assert message.startswith(f"--weights {path}: {says}"), message
    assert_one_plain_line(message, f"--weights {path}: ")


def test_a_state_dict_that_does_not_fit_the_torchvision_model_is_one_line(tmp_path):
    # It has the keys read_torchvision_state_dict checks for: load_state_dict finds the rest missing.
    path = tmp_path / "fasterrcnn-like.pth"
    fasterrcnn_like(path)
    with pytest.raises(ValueError) as refused:
        build_model(read_weights(str(path)))
    message = str(refused.value)
    assert message.startswith(f"--weights {path}: a state dict that does not fit torchvision's "
                              "maskrcnn_resnet50_fpn: 29"), message  # 29x missing keys, and the first two
    assert "missing (backbone.body.bn1.weight, backbone.body.bn1.bias, ...)" in message
    assert_one_plain_line(message, f"--weights {path}: ")


def test_long_text_is_cut_with_an_ellipsis(tmp_path):
    path = tmp_path / "words.pt"
    path.write_text("supercalifragilistic" * 100)
    with pytest.raises(ValueError, match=r"a text file starting 'supercalifragilistic\w+\.\.\.'$"):
        build_model(read_weights(str(path)))


@pytest.mark.parametrize("name", ["cat.jpg", "resnet18-model.pt", "resnet18.pth"])
def test_init_names_its_flag(name, tmp_path):
    from maskray.pipeline.train.initial_weights import initial_state

    write, says = BAD_FILES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as refused:
        initial_state(read_weights(str(path), flag="--init"))
    assert str(refused.value).startswith(f"--init {path}: {says}")


def test_the_model_api_says_it_too(tmp_path):
    path = tmp_path / "cat.jpg"
    image("JPEG")(path)
    with pytest.raises(ValueError, match=f"^{path}: not a loadable weights file: a JPEG image$"):
        MaskRCNN.load(path)
    with pytest.raises(ValueError, match=f"^{path}: not a loadable weights file: a JPEG image$"):
        MaskRCNN.from_torchvision(path)


@pytest.mark.parametrize("command, name", [("evaluate", "cat.jpg"), ("segment", "maskray-model.pt"),
                                           ("evaluate", "error.pt"), ("segment", "misfit.pt")])
def test_the_command_line_says_it_in_one_line(command, name, tmp_path, capsys):
    write, says = BAD_FILES[name]
    weights = tmp_path / name
    write(weights)
    (tmp_path / "images").mkdir()
    image("PNG")(tmp_path / "images" / "a.png")
    arguments = {"segment": [str(tmp_path / "images"), str(tmp_path / "out")],
                 "evaluate": ["--json", str(tmp_path / "x.json"), "--images", str(tmp_path / "images")]}[command]
    assert cli.main([command, *arguments, "--weights", str(weights), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"maskray {command}: error: --weights {weights}: {says}"), err
    assert_one_plain_line(err, f"maskray {command}: error: --weights {weights}: ")
    assert not (tmp_path / "out").exists()


def test_the_maskray_program_says_a_pickled_model_in_one_plain_line(tmp_path):
    # The report that started this: torch's text, with its colour codes, cut at its first line.
    weights = tmp_path / "model.pt"
    torch.save(torchvision.models.resnet18(weights=None), weights)
    done = subprocess.run([str(MASKRAY), "evaluate", "--weights", str(weights), "--json", str(tmp_path / "x.json"),
                           "--images", str(tmp_path)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"maskray evaluate: error: --weights {weights}: not a loadable weights file: a whole "
                           "pickled model (ResNet object); save its state_dict() instead: "
                           "torch.save(model.state_dict(), path)\n")


def test_a_torchvision_v2_state_dict_file_builds_the_v2_model(tmp_path):
    """What ``maskray segment --weights`` and ``evaluate --weights`` do with a v2 file."""
    path = tmp_path / "maskrcnn_v2.pth"
    torch.save(torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(),
               path)
    model = build_model(read_weights(str(path)))
    assert (model.config.fpn_norm, model.config.rpn_head_convs, model.config.box_head_convs) == ("batch", 2, 4)
