"""Image preprocessing without torchvision: resize + crop + normalize, matching each model family.

Eval: resize the shorter side to ``size`` (bicubic) then center crop ``size`` x ``size`` — the exact
arithmetic of HF ``CLIPImageProcessor`` (output long side ``int(size * long / short)``, crop offset
``(dim - size) // 2``). Train: random-resized-crop (open_clip's default scale (0.9, 1.0)).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass
class PreprocessConfig:
    """How a model wants its pixels. Saved in every model config, hashed into feature caches."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # "shortest" (resize + center crop) | "squash" (resize to size x size)
    train_scale: tuple[float, float] = (0.9, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        d = dict(d)
        for k in ("mean", "std", "train_scale", "train_ratio"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def hash(self) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def resize_shortest(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample=resample, reducing_gap=None)


def resize_center_crop_fused(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize-shorter-side + center-crop as ONE resize of just the source box that the crop keeps.

    ~25% less resampling work on 4:3 images, but the filter weights round differently from the
    two-step path, so pixels may differ by 1/255: used only on JPEG-draft-decoded images, which are
    already not bit-identical to the reference (the two-step path keeps exact HF parity).
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    left, top = (nw - size) // 2, (nh - size) // 2
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), resample=resample, box=box, reducing_gap=None)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:  # pad like HF (zeros) for images smaller than the crop
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, with an explicit RNG: (left, top, right, bottom)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


def to_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 HWC PIL -> normalized float32 CHW tensor ([3, H, W])."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return arr.sub_(m).div_(s)


def to_uint8_hwc(img: Image.Image) -> torch.Tensor:
    """uint8 HWC PIL -> uint8 ``[H, W, 3]`` tensor (a copy): what a DataLoader worker sends (1/4 of float32)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def normalize_uint8(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> normalized float32 ``[B, 3, H, W]`` (contiguous), bitwise equal to
    stacking :func:`to_tensor` of each image: the same float ops (``/ 255``, ``- mean``, ``/ std``), each
    exactly rounded per element, in the same order."""
    b, h, w, c = pixels.shape
    out = torch.empty((b, c, h, w), dtype=torch.float32)
    out.copy_(pixels.permute(0, 3, 1, 2)).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return out.sub_(m).div_(s)


@dataclass
class ImageTransform:
    """Callable PIL image -> ``[3, size, size]`` float tensor. ``train=True`` adds random-resized-crop."""

    cfg: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def geometry(self, img: Image.Image) -> Image.Image:
        """Resize/crop only (uint8 result): what a decode benchmark or a thumbnail needs."""
        resample = _RESAMPLE[self.cfg.interpolation]
        size = self.cfg.size
        if self.train:
            box = random_resized_crop_box(*img.size, self.cfg.train_scale, self.cfg.train_ratio, self.rng)
            return img.resize((size, size), resample=resample, box=box, reducing_gap=None)
        if self.cfg.resize_mode == "squash":
            return img.resize((size, size), resample=resample, reducing_gap=None)
        # decode_image marks draft-decoded images; info survives resize/convert, so also check the
        # image is still the one that was decoded
        drafted = (
            img.info.get("decoded_size") == img.size and img.info.get("original_size", img.size) != img.size
        )
        if drafted and min(img.size) >= size:
            return resize_center_crop_fused(img, size, resample)
        return center_crop(resize_shortest(img, size, resample), size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_tensor(self.geometry(_rgb(img)), self.cfg.mean, self.cfg.std)

    def uint8(self, img: Image.Image) -> torch.Tensor:
        """The geometry only, as uint8 ``[H, W, 3]``; :meth:`normalize` of a stack of these is bitwise
        ``torch.stack([self(img), ...])``. Workers send these: a quarter of the shared memory per batch
        (each batch is a fresh shared-memory segment, page-faulted in by the worker and the main process)."""
        return to_uint8_hwc(self.geometry(_rgb(img)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` from :meth:`uint8` -> the float32 ``[B, 3, H, W]`` batch the model reads."""
        return normalize_uint8(pixels, self.cfg.mean, self.cfg.std)


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    from clipforge.data.decode import to_rgb

    return to_rgb(img)
