"""Architectures for the three tasks, shared by training and export.

Demo models are small enough to train on two CPU cores; pretrained ones are torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

# Demo models see RGB in [0, 1] normalised with ImageNet statistics (Faster R-CNN's transform
# does this itself; export must do it for the classifier and the segmenter).
DEMO_MEAN = (0.485, 0.456, 0.406)
DEMO_STD = (0.229, 0.224, 0.225)

# FPN levels from ResNet-18 stages 2-4 (strides 8, 16, 32) plus a max-pooled level (stride 64).
# Stride 4 is left out and the FPN is narrow: together they make training ~3x cheaper on CPU,
# and the smallest demo shapes (~12 px) are still covered by the stride-8 level.
DEMO_RETURN_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}
DEMO_FPN_IN_CHANNELS = [128, 256, 512]
DEMO_FPN_CHANNELS = 64
DEMO_BOX_REPRESENTATION = 256
# Anchor sizes (one tuple per FPN level) that suit shapes 12-60 px across in 128 px images.
DEMO_ANCHOR_SIZES = ((16, 24), (32, 48), (64, 96), (128, 192))


def build_demo_classifier(num_classes: int) -> nn.Module:
    """Return a ResNet-18 classifier with `num_classes` outputs, randomly initialised."""
    return resnet18(weights=None, num_classes=num_classes)


def build_demo_detector(num_classes: int, image_size: int, backbone: nn.Module | None = None) -> FasterRCNN:
    """Return a ResNet-18-FPN Faster R-CNN; `num_classes` excludes background.

    `backbone` may be a trained ResNet-18 classifier whose trunk seeds the detector.
    The internal transform does not resize: inputs arrive letterboxed to `image_size`.
    """
    trunk = backbone if backbone is not None else resnet18(weights=None)
    fpn = BackboneWithFPN(
        trunk, DEMO_RETURN_LAYERS, DEMO_FPN_IN_CHANNELS, DEMO_FPN_CHANNELS, extra_blocks=LastLevelMaxPool()
    )
    anchors = AnchorGenerator(DEMO_ANCHOR_SIZES, ((0.5, 1.0, 2.0),) * len(DEMO_ANCHOR_SIZES))
    pooled = DEMO_FPN_CHANNELS * 7 * 7  # MultiScaleRoIAlign's default 7x7 output
    return FasterRCNN(
        fpn,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(pooled, DEMO_BOX_REPRESENTATION),
        box_predictor=FastRCNNPredictor(DEMO_BOX_REPRESENTATION, num_classes + 1),
        min_size=image_size,
        max_size=image_size,
        image_mean=list(DEMO_MEAN),
        image_std=list(DEMO_STD),
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        box_batch_size_per_image=64,
        box_detections_per_img=100,
    )


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with BatchNorm; input sides must divide by 2**depth."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_DoubleConv(in_channels, chans[0])])
        self.down.extend(_DoubleConv(chans[i], chans[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.merge = nn.ModuleList(_DoubleConv(chans[i] * 2, chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def build_demo_segmenter(num_classes: int) -> UNet:
    """Return a U-Net with `num_classes` outputs (background included)."""
    return UNet(num_classes)
