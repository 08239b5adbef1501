"""Architectures for the three tasks, shared by training and export.

Demo models are small enough to train on two CPU cores; pretrained ones are torchvision's.
The demo trunk is torchvision's ResNet-18 at half width (`DEMO_WIDTH` 32 channels in the first stage
instead of 64): a quarter of the arithmetic, which on two AVX2 cores made each classifier step 4x faster
(0.70 -> 0.16 s at batch 64; held-out top-1 0.974 after 1,000 steps, where the full width had 0.99
after 800). Measurements: loadtests/RESULTS.md "Demo training time on this machine".
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from tasks.segmentation import STRIDE as SEGMENTER_STRIDE

# Demo models see RGB in [0, 1] normalised with ImageNet statistics (Faster R-CNN's transform
# does this itself; export must do it for the classifier and the segmenter).
DEMO_MEAN = (0.485, 0.456, 0.406)
DEMO_STD = (0.229, 0.224, 0.225)

# Channels of the demo ResNet-18's first stage (torchvision's: 64); stages 2-4 double it each time.
DEMO_WIDTH = 32

# FPN levels from ResNet-18 stages 2-4 (strides 8, 16, 32) plus a max-pooled level (stride 64).
# Stride 4 is left out and the FPN is narrow: together they make training ~3x cheaper on CPU,
# and the smallest demo shapes (~12 px) are still covered by the stride-8 level.
DEMO_RETURN_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}
DEMO_FPN_IN_CHANNELS = [2 * DEMO_WIDTH, 4 * DEMO_WIDTH, 8 * DEMO_WIDTH]
DEMO_FPN_CHANNELS = 64
DEMO_BOX_REPRESENTATION = 256
# Anchor sizes (one tuple per FPN level) that suit shapes 12-60 px across in 128 px images.
DEMO_ANCHOR_SIZES = ((16, 24), (32, 48), (64, 96), (128, 192))


class SlimResNet18(ResNet):
    """torchvision's ResNet-18 (same modules, names and initialisation) with `width` channels in the first
    stage instead of 64; stages 2-4 have 2x, 4x and 8x that."""

    def __init__(self, num_classes: int = 1000, width: int = DEMO_WIDTH) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.fc = nn.Linear(8 * width, num_classes)
        for module in self.modules():  # ResNet's own initialisation, for the rebuilt modules
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)


def resnet18(weights: None = None, num_classes: int = 1000) -> SlimResNet18:
    """The demo trunk: a half-width ResNet-18 (`weights` must be None: the demo trains from scratch)."""
    if weights is not None:
        raise ValueError("the demo ResNet-18 has no pretrained weights")
    return SlimResNet18(num_classes)


def build_demo_classifier(num_classes: int) -> nn.Module:
    """Return a half-width ResNet-18 classifier with `num_classes` outputs, randomly initialised."""
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
    """U-Net (Ronneberger et al. 2015) on a ResNet-18 encoder; input sides must divide by 32.

    `down` holds one stage per resolution: the ResNet's stem and stages 1-4 (strides 2..32).
    `encoder` may be a trained ResNet-18 classifier whose trunk seeds the encoder; the decoder
    upsamples bilinearly and merges each skip down to stride 4, and the class logits are then
    upsampled to the input's size. (Merging the stride-2 skip too cost 40% of each training step on
    two CPU cores; the recipe spends that time on more steps instead.)
    """

    STRIDE = SEGMENTER_STRIDE  # the deepest stage's stride: input sides must be multiples of it

    def __init__(self, num_classes: int, encoder: nn.Module | None = None) -> None:
        super().__init__()
        trunk = encoder if encoder is not None else resnet18(weights=None)
        self.down = nn.ModuleList(
            [
                nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu),
                nn.Sequential(trunk.maxpool, trunk.layer1),
                trunk.layer2,
                trunk.layer3,
                trunk.layer4,
            ]
        )
        width = trunk.conv1.out_channels
        skips = [width, 2 * width, 4 * width]  # channels of down[1..3] (strides 4, 8, 16); down[4] gives 8 x width
        outs = [48, 64, 128]  # decoder channels at each skip's resolution
        ins = [*outs[1:], 8 * width]
        self.merge = nn.ModuleList(_DoubleConv(ins[i] + skips[i], outs[i]) for i in reversed(range(3)))
        self.head = nn.Conv2d(outs[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        y = x
        for stage in self.down:
            y = stage(y)
            skips.append(y)
        y = skips.pop()
        for merge in self.merge:
            skip = skips.pop()
            up = nn.functional.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = merge(torch.cat([skip, up], dim=1))
        logits = self.head(y)
        return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def encoder_trunk(unet: UNet) -> nn.Module:
    """A ResNet-18 whose trunk is (a copy of) `unet`'s trained encoder: it seeds the detector's backbone."""
    trunk = resnet18(weights=None)
    stem, pool_and_layer1, layer2, layer3, layer4 = copy.deepcopy(unet.down)
    trunk.conv1, trunk.bn1 = stem[0], stem[1]
    trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4 = pool_and_layer1[1], layer2, layer3, layer4
    return trunk


def build_demo_segmenter(num_classes: int, encoder: nn.Module | None = None) -> UNet:
    """Return a U-Net with `num_classes` outputs (background included).

    `encoder` may be a trained ResNet-18 classifier whose trunk seeds the U-Net's encoder.
    """
    return UNet(num_classes, encoder=encoder)
