"""EfficientNet-Lite0 as an image tower: frozen prefix (cacheable) + trainable rest.

``unlock``: 0 = locked (prefix = everything, output pooled), -1 = fully trainable (stem included),
N = the last N units trainable (units = 16 MBConv blocks + the 1x1 head conv, so N=1 unlocks only the
head conv). The frozen prefix runs BN-folded convs in channels_last under ``no_grad`` (optionally in
bf16 autocast) and is always in eval mode; ``freeze_bn`` also keeps BN statistics of unlocked blocks
fixed (small contrastive batches are poor BN batches).

``pool``: ``mean`` -> [B, 1280]; ``tokens`` -> [B, HW, 1280] for attention pooling; ``multiscale`` ->
mean-pooled outputs of the last four stages concatenated (112+192+320+1280 = 1904 dims).
"""

from __future__ import annotations

import torch
from torch import nn

from clipforge.models.efficientnet_lite import EfficientNetLite0, FusedPrefix

N_UNITS = 17
MULTISCALE_TAPS = (10, 14, 15, 16)  # units ending stages 5, 6, 7 and the head conv


class EfficientNetTower(nn.Module):
    def __init__(
        self,
        pretrained: bool = True,
        unlock: int = 0,
        pool: str = "mean",
        freeze_bn: bool = True,
        fuse_bn: bool = True,
        channels_last: bool = True,
        prefix_dtype: str = "float32",
        keep_classifier: bool = False,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "tokens", "multiscale"):
            raise ValueError(f"efficientnet tower: unknown pool {pool!r}")
        if not -1 <= unlock <= N_UNITS:
            raise ValueError(f"efficientnet-lite0: unlock must be -1..{N_UNITS}, got {unlock}")
        net = EfficientNetLite0.pretrained() if pretrained else EfficientNetLite0()
        # The ImageNet classifier is not part of the tower; a semantic-prior head may keep it (frozen).
        self.classifier = net._fc.requires_grad_(False) if keep_classifier else None
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net
        self.unlock, self.pool, self.freeze_bn = unlock, pool, freeze_bn
        self.fuse_bn, self.channels_last, self.prefix_dtype = fuse_bn, channels_last, prefix_dtype
        self.n_frozen = N_UNITS if unlock == 0 else (-1 if unlock == -1 else N_UNITS - unlock)
        self.out_dim = sum(net.unit_channels[i] for i in MULTISCALE_TAPS) if pool == "multiscale" else 1280
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self._fused: list[FusedPrefix] = []  # built lazily; a list so it stays out of state_dict
        self.register_load_state_dict_post_hook(lambda *_: self._fused.clear())
        self.train(False)

    # -- which parts are frozen ---------------------------------------------------------------
    def frozen_parameters(self) -> list[nn.Parameter]:
        if self.n_frozen < 0:
            return []
        mods = [self.net._conv_stem, self.net._bn0, *self.net.units[: self.n_frozen]]
        return [p for m in mods for p in m.parameters()]

    @property
    def locked(self) -> bool:
        return self.n_frozen == N_UNITS

    def train(self, mode: bool = True) -> EfficientNetTower:
        super().train(mode)
        if self.n_frozen >= 0:
            for m in [self.net._conv_stem, self.net._bn0, *self.net.units[: self.n_frozen]]:
                m.eval()
        if self.freeze_bn:
            for m in self.net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half(): drop the fused copy, rebuild lazily
        self._fused = []
        return super()._apply(fn, recurse)

    def _prefix_module(self) -> FusedPrefix | None:
        if not self.fuse_bn:
            return None
        if not self._fused:
            fp = FusedPrefix(self.net, self.n_frozen)
            if self.channels_last:
                fp = fp.to(memory_format=torch.channels_last)
            self._fused.append(fp)
        return self._fused[0]

    # -- forward in two parts -----------------------------------------------------------------
    def prefix(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.n_frozen < 0:
            return {"pixels": pixels}
        taps = [t for t in MULTISCALE_TAPS if t < self.n_frozen] if self.pool == "multiscale" else []
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if self.prefix_dtype == "bfloat16" else None
        with torch.no_grad(), torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype is not None):
            fused = self._prefix_module()
            if fused is not None:
                x, pooled = fused(pixels, taps)
            else:
                x, pooled = self.net.stem(pixels), []
                for i, u in enumerate(self.net.units[: self.n_frozen]):
                    x = u(x)
                    if i in taps:
                        pooled.append(x.mean((2, 3)))
        x, pooled = x.float(), [p.float() for p in pooled]
        if self.locked:
            return {"tokens" if self.pool == "tokens" else "pooled": self._pool(x, pooled)}
        out = {"map": x}
        if pooled:
            out["taps"] = torch.cat(pooled, dim=1)
        return out

    def rest(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Trainable units + pooling: [B, out_dim] (or [B, HW, 1280] for ``pool='tokens'``)."""
        if "pooled" in feats or "tokens" in feats:
            return feats.get("pooled", feats.get("tokens"))
        if "pixels" in feats:
            x = feats["pixels"]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x, start = self.net.stem(x), 0
        else:
            x, start = feats["map"], self.n_frozen
        pooled = [feats["taps"]] if "taps" in feats else []
        for i, u in enumerate(self.net.units[start:], start=start):
            x = u(x)
            if self.pool == "multiscale" and i in MULTISCALE_TAPS:
                pooled.append(x.mean((2, 3)))
        return self._pool(x, pooled)

    def _pool(self, x: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        if self.pool == "tokens":
            return x.flatten(2).transpose(1, 2).contiguous()
        if self.pool == "multiscale":
            return torch.cat(pooled, dim=1)
        return x.mean((2, 3))
