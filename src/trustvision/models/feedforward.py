"""Feed-forward classifiers: ``small-cnn``, ``resnet20``, ``torchvision:<name>`` and ``timm:<name>``.

Every model here is an :class:`~trustvision.models.ImageClassifier`: it takes images in [0, 1],
normalises them with its own ``mean``/``std`` buffers, exposes ``features(x)`` (penultimate layer,
shape (N, F)) and returns logits (N, num_classes) from ``forward(x)``.

References:
    He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016 (ResNet-20 is
    the CIFAR-10 network of Sec. 4.2: three stages of three basic blocks, widths 16/32/64).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision.models import register_model
from trustvision.models._base import ImageClassifier

__all__ = ["SmallCNN", "ResNet20", "TorchvisionClassifier", "TimmClassifier"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_widths(widths, example: str) -> list[int]:
    """``widths`` as a list of positive ints, else a ValueError naming an example."""
    ok = (isinstance(widths, (list, tuple)) and len(widths) > 0
          and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 65536 for w in widths))
    if not ok:
        raise ValueError(f"widths must be a list of whole numbers from 1 to 65536, e.g. "
                         f"widths={example}, got {widths!r}")
    return list(widths)


def _check_prob(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class SmallCNN(ImageClassifier):
    """A compact CNN for small images (8x8 digits, 25x25 faces, 32x32 textures/CIFAR).

    Each stage is conv3x3-BN-ReLU followed by 2x2 max pooling (``ceil_mode``, so odd sizes such as
    25 work; skipped once the map is 1x1); the last stage ends in adaptive average pooling, optional
    dropout, and a linear classifier. With the default widths (32, 64, 128) it has about 93k
    parameters (~0.4 MB in float32). ``features`` has ``widths[-1]`` dimensions.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int | Sequence[int] = 32,
        widths: Sequence[int] = (32, 64, 128),
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, in_chans, image_size, mean, std)
        widths = _check_widths(widths, "32,64,128")
        dropout = _check_prob(dropout, "dropout")
        layers: list[nn.Module] = []
        c_in, size = self.in_chans, min(self.image_size)
        for i, width in enumerate(widths):
            layers.append(_conv_bn_relu(c_in, width))
            if i < len(widths) - 1 and size > 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                size = (size + 1) // 2
            c_in = width
        layers.append(nn.AdaptiveAvgPool2d(1))
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        self.num_features = c_in
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(feats))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # projection shortcut (option B of the paper)
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(ImageClassifier):
    """CIFAR-style ResNet-20 (He et al. 2016, Sec. 4.2): 3 stages x 3 basic blocks, widths 16/32/64.

    ``depth`` = 6n + 2 selects other members of the family (32, 44, 56, ...). Features are the
    globally average-pooled last stage (N, 64).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int | Sequence[int] = 32,
        depth: int = 20,
        widths: Sequence[int] = (16, 32, 64),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(num_classes, in_chans, image_size, mean, std)
        widths = _check_widths(widths, "16,32,64")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise TrustVisionError(f"resnet depth must be 6n+2 (20, 32, 44, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = _conv_bn_relu(self.in_chans, widths[0])
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, width in enumerate(widths):
            for b in range(n):
                blocks.append(_BasicBlock(c_in, width, stride=2 if (stage > 0 and b == 0) else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c_in
        self.fc = nn.Linear(c_in, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


def _imagenet_default(in_chans: int, mean: Sequence[float] | None, std: Sequence[float] | None):
    """``(mean, std)``, ImageNet's where not given for 3 channels (pretrained weights expect it)."""
    if in_chans == 3:
        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
    return mean, std


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class TorchvisionClassifier(ImageClassifier):
    """Wraps any torchvision classification model (``torchvision:resnet18``, ``torchvision:vgg11``...).

    The first ``Conv2d`` is rebuilt for ``in_chans`` (pretrained weights are averaged over the RGB
    channels and repeated), the last ``nn.Linear`` becomes the ``num_classes`` classifier and
    ``features`` is that classifier's input. :func:`trustvision.models.create` refuses
    ``pretrained=True`` (nothing is downloaded at run time): load a torchvision state dict with
    ``models.load("resnet18.pth", architecture="torchvision:resnet18", num_classes=1000, ...)``.
    Default normalisation is ImageNet's for 3 channels, 0.5/0.5 otherwise.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_chans: int = 3,
        image_size: int | Sequence[int] = 224,
        pretrained: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, in_chans, image_size, *_imagenet_default(in_chans, mean, std))
        import torchvision

        try:
            builder = torchvision.models.get_model_builder(arch)
        except ValueError:
            names = torchvision.models.list_models(module=torchvision.models)
            raise TrustVisionError(
                f"unknown torchvision model {arch!r}; use a classification model such as "
                f"{', '.join(n for n in ('resnet18', 'mobilenet_v3_small', 'vgg11') if n in names)}"
                " (torchvision.models.list_models() lists them)"
            ) from None
        if pretrained:
            net = builder(weights="DEFAULT", **kwargs)
        else:
            kwargs.setdefault("num_classes", num_classes)
            net = builder(weights=None, **kwargs)
        if hasattr(net, "aux_logits"):  # inception / googlenet: keep a single output
            net.aux_logits = False
            for aux in ("AuxLogits", "aux1", "aux2"):
                if hasattr(net, aux):
                    setattr(net, aux, None)
        convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
        linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not convs or not linears:
            raise TrustVisionError(
                f"torchvision model {arch!r} has no Conv2d stem or Linear classifier; "
                "pick a convolutional classifier such as torchvision:resnet18"
            )
        conv_name, conv = convs[0]
        if conv.in_channels != self.in_chans:
            new = nn.Conv2d(self.in_chans, conv.out_channels, conv.kernel_size, conv.stride,
                            conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                            conv.padding_mode)
            if pretrained:
                with torch.no_grad():
                    w = conv.weight.mean(dim=1, keepdim=True)
                    new.weight.copy_(w.repeat(1, self.in_chans, 1, 1) * 3.0 / self.in_chans)
                    if conv.bias is not None:
                        new.bias.copy_(conv.bias)
            _set_submodule(net, conv_name, new)
        fc_name, fc = linears[-1]
        self.num_features = fc.in_features
        if fc.out_features != self.num_classes or pretrained:
            fc = nn.Linear(fc.in_features, self.num_classes)
        _set_submodule(net, fc_name, nn.Identity())
        self.net = net
        self.fc = fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


class TimmClassifier(ImageClassifier):
    """Wraps a timm model (``timm:<name>``; needs ``pip install timm``).

    timm adapts the stem to ``in_chans`` and the head to ``num_classes`` itself; ``features`` is the
    pre-logits vector. Default normalisation is ImageNet's for 3 channels, 0.5/0.5 otherwise.
    :func:`trustvision.models.create` refuses ``pretrained=True``; a checkpoint's config.json may
    not set ``checkpoint_path``, ``pretrained_cfg`` or other file/URL keywords.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_chans: int = 3,
        image_size: int | Sequence[int] = 224,
        pretrained: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, in_chans, image_size, *_imagenet_default(in_chans, mean, std))
        try:
            import timm
        except ImportError:
            raise TrustVisionError(
                f"model 'timm:{arch}' needs the timm package; install it with `pip install timm`"
            ) from None
        try:
            self.net = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes,
                                         in_chans=in_chans, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise TrustVisionError(
                    f"unknown timm model {arch!r}; timm.list_models() lists the names"
                ) from None
            raise
        self.num_features = self.net.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True).flatten(1)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.get_classifier()(feats)


@register_model("small-cnn")
def small_cnn(num_classes: int, in_chans: int = 3, image_size: int | Sequence[int] = 32,
              **kw) -> SmallCNN:
    """Compact conv-BN-ReLU network for 8x8 to 32x32 images (see :class:`SmallCNN`)."""
    return SmallCNN(num_classes, in_chans, image_size, **kw)


@register_model("resnet20")
def resnet20(num_classes: int, in_chans: int = 3, image_size: int | Sequence[int] = 32,
             **kw) -> ResNet20:
    """CIFAR ResNet-20 (see :class:`ResNet20`)."""
    return ResNet20(num_classes, in_chans, image_size, **kw)


@register_model("torchvision", prefix=True)
def torchvision_model(arch: str, num_classes: int, in_chans: int = 3,
                      image_size: int | Sequence[int] = 224, **kw) -> TorchvisionClassifier:
    """Any torchvision classifier, e.g. ``torchvision:resnet18`` (see :class:`TorchvisionClassifier`)."""
    return TorchvisionClassifier(arch, num_classes, in_chans, image_size, **kw)


@register_model("timm", prefix=True)
def timm_model(arch: str, num_classes: int, in_chans: int = 3,
               image_size: int | Sequence[int] = 224, **kw) -> TimmClassifier:
    """Any timm classifier, e.g. ``timm:resnet18`` (see :class:`TimmClassifier`)."""
    return TimmClassifier(arch, num_classes, in_chans, image_size, **kw)
