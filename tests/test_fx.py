"""torch.fx: maskray's RoI ops and poolers are FX leaves, as torchvision's are, so that
symbolic_trace, graph passes and torchvision's create_feature_extractor work on the model."""

import pytest
import torch
from torch import Tensor, fx, nn
from torchvision.models.feature_extraction import create_feature_extractor

from maskray.model.backbone import build_backbone
from maskray.model.box_head import BoxHead, BoxPredictor
from maskray.model.config import MaskRCNNConfig
from maskray.model.ops import MultiScaleRoIAlign, MultiScaleRoIPool, RoIAlign, RoIPool

LEVELS = ["0", "1", "2", "3"]


def _features(channels: int = 8, image: int = 128) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(2, channels, image // 2 ** (k + 2), image // 2 ** (k + 2), generator=generator)
        for k, name in enumerate(LEVELS)
    }


def _boxes() -> list[Tensor]:
    # Small and large boxes, so that several FPN levels are pooled from.
    return [
        torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 5.0, 120.0, 110.0]]),
        torch.tensor([[30.0, 30.0, 60.0, 70.0], [1.0, 2.0, 127.0, 127.0], [40.0, 8.0, 48.0, 20.0]]),
    ]


class _SingleLevel(nn.Module):
    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, feature: Tensor, rois: Tensor) -> Tensor:
        return self.op(feature, rois).relu()


class _BoxHeadWithPooler(nn.Module):
    """The box branch of the RoI heads: pooler -> two-layer MLP -> class logits and box deltas."""

    def __init__(self, pooler: nn.Module, channels: int):
        super().__init__()
        self.pooler = pooler
        self.head = BoxHead(channels * 7 * 7, 32)
        self.predictor = BoxPredictor(32, 5)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]):
        return self.predictor(self.head(self.pooler(features, boxes, image_shapes)))


def _call_targets(graph: fx.Graph) -> set[str]:
    return {getattr(node.target, "__name__", str(node.target)) for node in graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("op", [RoIAlign(5, 0.25, 2), RoIPool(5, 0.25)], ids=["roi_align", "roi_pool"])
def test_single_level_op_traces_as_one_leaf_call(op):
    module = _SingleLevel(op)
    traced = fx.symbolic_trace(module)
    feature = _features()["0"]
    rois = torch.tensor([[0, 1.0, 2.0, 60.0, 50.0], [1, 10.0, 0.0, 30.0, 127.0]])
    assert torch.equal(traced(feature, rois), module(feature, rois))
    # The functional op is one node, not its argument checks unrolled.
    assert type(op).__name__.lower().replace("roi", "roi_") in _call_targets(traced.graph)


@pytest.mark.parametrize("pooler_class", [MultiScaleRoIAlign, MultiScaleRoIPool])
def test_box_head_with_pooler_traces_and_matches_eager(pooler_class):
    arguments = (LEVELS, 7, 2) if pooler_class is MultiScaleRoIAlign else (LEVELS, 7)
    module = _BoxHeadWithPooler(pooler_class(*arguments), channels=8).eval()
    traced = fx.symbolic_trace(module)
    features, boxes, shapes = _features(), _boxes(), [(128, 128), (128, 128)]
    eager_logits, eager_deltas = module(features, boxes, shapes)
    traced_logits, traced_deltas = traced(features, boxes, shapes)
    assert torch.equal(traced_logits, eager_logits)
    assert torch.equal(traced_deltas, eager_deltas)
    assert "multiscale_pool" in _call_targets(traced.graph)


def test_traced_graph_takes_a_graph_pass():
    """A pass that rewrites the traced graph (relu -> gelu) runs, and the result changes accordingly."""
    module = _SingleLevel(RoIAlign(4, 0.25, 2))
    traced = fx.symbolic_trace(module)
    for node in traced.graph.nodes:
        if node.op == "call_method" and node.target == "relu":
            node.target = "sigmoid"
    traced.recompile()
    feature = _features()["0"]
    rois = torch.tensor([[0, 1.0, 2.0, 60.0, 50.0]])
    assert torch.allclose(traced(feature, rois), RoIAlign(4, 0.25, 2)(feature, rois).sigmoid())


def test_backbone_traces_and_feeds_create_feature_extractor():
    backbone = build_backbone(MaskRCNNConfig.light()).eval()
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    # Traced with autograd on, as torchvision's feature-extraction users do: the BatchNorm fold
    # that conv_bn applies under no_grad reads a cache that a symbolic trace cannot follow.
    eager = backbone(images)
    traced = fx.symbolic_trace(backbone)(images)
    assert list(traced) == list(eager)
    for name in eager:
        assert torch.equal(traced[name], eager[name])

    # Feature extraction at a trunk stage and an FPN output, the way torchvision users ask for them.
    extractor = create_feature_extractor(backbone, return_nodes={"body.layer2": "c3", "fpn.layer_blocks.0": "p2_conv"})
    extracted = extractor(images)
    assert set(extracted) == {"c3", "p2_conv"}
    # The FPN's finest output is its first layer block's output, so the extracted node must equal it.
    assert torch.equal(extracted["p2_conv"], eager["0"])
    assert extracted["c3"].shape[-2:] == (images.shape[-2] // 8, images.shape[-1] // 8)
