"""The Mask R-CNN configuration: one dataclass that says everything a model is built from.

Three presets: :meth:`MaskRCNNConfig.resnet50_fpn`, whose defaults are torchvision's
``maskrcnn_resnet50_fpn`` (so its state dicts load and its detections are reproduced),
:meth:`MaskRCNNConfig.resnet50_fpn_v2`, torchvision's ``maskrcnn_resnet50_fpn_v2`` (BatchNorm in
the FPN and the heads, a two-conv RPN head, a four-conv box head), and
:meth:`MaskRCNNConfig.light`, a ResNet-18-FPN on smaller images for the CPU (tests, the demo,
the CPU benchmarks). The fields that select v2's parts default to v1's, so configs saved before
they existed load as what they were. A config is plain data (numbers, strings, tuples), so it
goes into a checkpoint that ``torch.load(weights_only=True)`` can read back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from maskray.model.precision import PRECISIONS

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONE_NORMS = ("frozen", "batch")
CONV_NORMS = ("none", "batch")  # after the convs of the FPN and of the heads (maskray.model.conv_norm)
POOLERS = ("roi_align", "roi_pool")


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """``__background__`` then ``class_1`` .. ``class_{n-1}``: a placeholder users replace."""
    return ("__background__",) + tuple(f"class_{i}" for i in range(1, num_classes))


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Everything a :class:`model.MaskRCNN` is built from. Index 0 of the classes is background."""

    # classes
    num_classes: int = 91
    class_names: tuple[str, ...] = ()

    # backbone: a ResNet trunk with frozen BatchNorm, and an FPN over its four stages.
    # backbone_norm="batch" trains the trunk's BatchNorm (training from scratch, where there
    # are no statistics to freeze, and torchvision's v2); in eval mode it is folded like a frozen
    # one. fpn_norm="batch" puts a BatchNorm after every FPN conv (v2).
    backbone: str = "resnet50"
    trainable_backbone_layers: int = 3
    fpn_channels: int = 256
    backbone_norm: str = "frozen"
    fpn_norm: str = "none"

    # image transform
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32

    # anchors: one size per FPN level, every aspect ratio at every level
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    # region proposal network
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    rpn_head_convs: int = 1  # 3x3 convs + ReLU before the RPN's predictions (v2: 2)

    # RoI heads
    pooler: str = "roi_align"
    box_pool_size: int = 7
    mask_pool_size: int = 14
    pool_sampling_ratio: int = 2
    representation_size: int = 1024
    # box head: box_head_convs=0 is Fast R-CNN's two fully connected layers of
    # representation_size (fc6, fc7); N > 0 is v2's N 3x3 convs of box_head_channels, then one
    # fully connected layer. head_norm: what follows the convs of the box and mask heads (v2: "batch").
    box_head_convs: int = 0
    box_head_channels: int = 256
    head_norm: str = "none"
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)

    # mask head; mask=False makes the model a Faster R-CNN
    mask: bool = True
    mask_head_channels: int = 256
    mask_head_layers: int = 4
    mask_threshold: float = 0.5

    # inference speed: channels_last convolutions (faster on CPUs with oneDNN and on tensor
    # cores); frozen BatchNorm folded into the convs before it; autocast dtype for inference on
    # CUDA ("bfloat16", "float16") or None. channels_last and folding round differently from
    # torchvision's plain path (about 1e-6 relative); switch both off to reproduce it bit for bit.
    # precision: "auto", "fp32", "bf16", "fp16" or None (float32 on CPUs, cuda_autocast on GPUs);
    # the rule is maskray.model.precision's.
    channels_last: bool = True
    fold_batchnorm: bool = True
    cuda_autocast: str | None = "float16"
    precision: str | None = None

    def __post_init__(self) -> None:
        # Lists from JSON or a checkpoint become tuples, so configs compare and hash alike.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        if not self.class_names:
            object.__setattr__(self, "class_names", default_class_names(self.num_classes))
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"MaskRCNNConfig.{name}: {why} (got {getattr(self, name)!r})")

        if self.num_classes < 2:
            fail("num_classes", "needs background and at least one class")
        if len(self.class_names) != self.num_classes:
            fail("class_names", f"needs one name per class, {self.num_classes} including background")
        if self.backbone not in BACKBONES:
            fail("backbone", f"must be one of {BACKBONES}")
        if not 0 <= self.trainable_backbone_layers <= 5:
            fail("trainable_backbone_layers", "must be in [0, 5]")
        if self.backbone_norm not in BACKBONE_NORMS:
            fail("backbone_norm", f"must be one of {BACKBONE_NORMS}")
        # backbone_norm="batch" with frozen stages is torchvision's v2 as built for trained weights:
        # those stages' weights stay, their BatchNorm still normalises by batch statistics in training.
        for name in ("fpn_norm", "head_norm"):
            if getattr(self, name) not in CONV_NORMS:
                fail(name, f"must be one of {CONV_NORMS}")
        if self.rpn_head_convs < 1:
            fail("rpn_head_convs", "must be at least 1")
        if self.box_head_convs < 0:
            fail("box_head_convs", "must be 0 (two fully connected layers) or more")
        if self.pooler not in POOLERS:
            fail("pooler", f"must be one of {POOLERS}")
        if not self.min_size or min(self.min_size) <= 0:
            fail("min_size", "needs at least one size, all positive")
        if self.max_size <= 0:
            fail("max_size", "must be positive")
        if self.size_divisible <= 0:
            fail("size_divisible", "must be positive")
        if len(self.image_std) != 3 or min(abs(s) for s in self.image_std) == 0:
            fail("image_std", "needs three non-zero values")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            fail("aspect_ratios", "needs at least one ratio, all positive")
        for name in ("fpn_channels", "representation_size", "mask_head_channels", "box_head_channels",
                     "box_detections_per_img"):
            if getattr(self, name) <= 0:
                fail(name, "must be positive")
        for name in ("rpn_positive_fraction", "box_positive_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                fail(name, "must be in (0, 1]")
        if len(self.anchor_sizes) != 5:
            fail("anchor_sizes", "needs one size per FPN level (P2-P6), five")
        for name in ("box_score_thresh", "box_nms_thresh", "rpn_nms_thresh", "mask_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "must be in [0, 1]")
        if self.cuda_autocast not in (None, "float16", "bfloat16"):
            fail("cuda_autocast", "must be None, 'float16' or 'bfloat16'")
        if self.precision is not None and self.precision not in PRECISIONS:
            fail("precision", f"must be None or one of {PRECISIONS}")

    # presets ---------------------------------------------------------------------------

    @classmethod
    def resnet50_fpn(cls, num_classes: int = 91, class_names: tuple[str, ...] = (), **overrides: Any) -> MaskRCNNConfig:
        """torchvision's ``maskrcnn_resnet50_fpn``: the dataclass defaults."""
        return cls(num_classes=num_classes, class_names=tuple(class_names), **overrides)

    @classmethod
    def resnet50_fpn_v2(cls, num_classes: int = 91, class_names: tuple[str, ...] = (), **overrides: Any) -> MaskRCNNConfig:
        """torchvision's ``maskrcnn_resnet50_fpn_v2`` (``mask=False``: ``fasterrcnn_resnet50_fpn_v2``),
        as built for trained weights. What v2 changes: the trunk's BatchNorm is a trainable one
        (three stages trainable, as for v1), BatchNorm after every conv of the FPN, the box head
        and the mask head, two convs in the RPN head, and a box head of four convs and one fully
        connected layer. Transform, anchors, samplers and thresholds are v1's."""
        settings: dict[str, Any] = {"backbone_norm": "batch", "fpn_norm": "batch", "rpn_head_convs": 2,
                                    "box_head_convs": 4, "box_head_channels": 256, "head_norm": "batch"}
        settings.update(overrides)
        return cls(num_classes=num_classes, class_names=tuple(class_names), **settings)

    @classmethod
    def light(cls, num_classes: int = 91, class_names: tuple[str, ...] = (), **overrides: Any) -> MaskRCNNConfig:
        """ResNet-18-FPN, 128 FPN channels, images of at most 320x512: fast on a CPU."""
        settings: dict[str, Any] = dict(
            backbone="resnet18",
            fpn_channels=128,
            min_size=(320,),
            max_size=512,
            anchor_sizes=(16, 32, 64, 128, 256),
            rpn_pre_nms_top_n_train=1000,
            rpn_pre_nms_top_n_test=500,
            rpn_post_nms_top_n_train=1000,
            rpn_post_nms_top_n_test=300,
            representation_size=512,
            box_batch_size_per_image=256,
            mask_head_channels=128,
        )
        settings.update(overrides)
        return cls(num_classes=num_classes, class_names=tuple(class_names), **settings)

    def replace(self, **changes: Any) -> MaskRCNNConfig:
        """A copy with some fields changed (class names are re-made if the class count changes)."""
        if "num_classes" in changes and "class_names" not in changes:
            changes["class_names"] = ()
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints and manifests (tuples become lists)."""

        def plain(value: Any) -> Any:
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskRCNNConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MaskRCNNConfig: unknown fields {unknown}")
        return cls(**data)
