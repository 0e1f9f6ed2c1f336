"""maskray's model: Mask R-CNN and the compiled RoI operators it stands on (model.ops)."""
