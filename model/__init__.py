"""maskray's model: Mask R-CNN and the compiled RoI operators it stands on (maskray.model.ops).

    from maskray.model import MaskRCNN, MaskRCNNConfig
    model = MaskRCNN(MaskRCNNConfig.light(num_classes=4)).eval()
    detections = model([image])   # boxes, labels, scores, masks (COCO RLE), areas
"""

from maskray.model.config import MaskRCNNConfig
from maskray.model.mask_rcnn import LOSS_NAMES, MaskRCNN

__all__ = ["LOSS_NAMES", "MaskRCNN", "MaskRCNNConfig"]
