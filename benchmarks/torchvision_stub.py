"""A stand-in for packages the peer tools import but our benchmarks never use (torchvision above all).

torchvision's registry wheel fails against the CPU torch build here ("operator torchvision::nms does not
exist"); open_clip and clip-retrieval import it only for image transforms and FrozenBatchNorm2d, which
the measured paths never touch. Every name resolves to a placeholder class whose *use* raises, so a
benchmark that did touch it fails loudly instead of measuring something else.

This one file serves two ways: ``install()`` registers it in ``sys.modules`` (in-process, e.g.
``openclip_parity.py`` and the open_clip step of ``bench_train.py``), and ``write_package(root, names)``
copies this module's source as packages on disk for tools that spawn their own processes
(``bench_inference.py`` puts ``root`` on PYTHONPATH). Standard library only: it runs in side venvs.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

TORCHVISION = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.ops",
    "torchvision.ops.misc",
)


class Meta(type):  # class attributes (InterpolationMode.BICUBIC) are placeholders, not errors
    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return f"{cls.__name__}.{attr}"


class Unavailable(metaclass=Meta):
    def __init__(self, *a, **k):
        raise RuntimeError("stub: not available in this benchmark")


def __getattr__(attr: str):
    """Any other name of a stubbed module: a placeholder class (dunders stay absent, as on a module)."""
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (Unavailable,), {})


def install(names: tuple[str, ...] = TORCHVISION) -> None:
    """Replace ``names`` (and anything already imported below them) in ``sys.modules`` by stubs."""
    for name in [m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in names)]:
        del sys.modules[name]
    for name in names:
        m = types.ModuleType(name)
        m.__getattr__ = __getattr__
        m.__path__ = []
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = m
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, m)


def write_package(root: str | Path, names: tuple[str, ...] = TORCHVISION) -> Path:
    """Write a stub package for each dotted name under ``root`` (put ``root`` on PYTHONPATH)."""
    root = Path(root)
    source = Path(__file__).read_text()
    for name in names:
        path = root.joinpath(*name.split(".")) / "__init__.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root
