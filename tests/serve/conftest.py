"""Serve fixtures: the tiny test model (shared with tests/index), a small index, a live server thread."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "clipforge_index_test_fixtures", Path(__file__).resolve().parents[1] / "index" / "index_testutils.py"
)
fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fixtures
_spec.loader.exec_module(fixtures)
TinyClip, write_shard = fixtures.TinyClip, fixtures.write_shard


@pytest.fixture(scope="session")
def tiny_model_serve():
    return TinyClip().eval()


@pytest.fixture(scope="session")
def tiny_index_dir(tmp_path_factory, tiny_model_serve) -> Path:
    from clipforge.index import BuildOptions, build_index

    d = tmp_path_factory.mktemp("serve_index")
    write_shard(d / "a-000000.tar", 24, prefix="a")
    write_shard(d / "b-000001.tar", 24, prefix="b", start=24)
    build_index(
        str(d / "*.tar"), tiny_model_serve, d / "idx", BuildOptions(batch_size=16, workers=0), progress=False
    )
    return d / "idx"


def make_server(model, index_dir, **cfg):
    from clipforge.index import ClipIndex
    from clipforge.serve.app import create_app
    from clipforge.serve.server import ServerThread
    from clipforge.serve.service import ClipService, ServeConfig

    index = ClipIndex.load(index_dir) if index_dir is not None else None
    return ServerThread(create_app(ClipService(model, index, ServeConfig(**cfg))))


@pytest.fixture(scope="session")
def server_factory():
    """make_server(model, index_dir, **ServeConfig fields) -> a ServerThread context manager."""
    return make_server


@pytest.fixture(scope="module")
def server_url(tiny_model_serve, tiny_index_dir):
    with make_server(
        tiny_model_serve, tiny_index_dir, max_upload_bytes=200_000, max_image_pixels=1_000_000
    ) as url:
        yield url


@pytest.fixture
def client(server_url):
    from clipforge.serve import Client

    with Client(server_url) as c:
        yield c


@pytest.fixture(scope="session")
def sample_jpeg(tiny_index_dir) -> bytes:
    from clipforge.data.reader import iter_tar_samples

    raw = next(iter(iter_tar_samples(str(tiny_index_dir.parent / "b-000001.tar"))))
    return raw["jpg"]


CAPTIONS = {"red": "a red square", "green": "a green square", "blue": "a blue square"}


def train_tiny_captioner(model, steps: int = 150):
    """A tiny decoder that learns (for the serve tests' TinyClip) colour -> "a <colour> square"."""
    import torch

    from clipforge.caption.captioner import Captioner, encoder_fingerprint
    from clipforge.caption.decoder import CaptionDecoder, DecoderConfig
    from clipforge.caption.train import caption_loss, pad_tokens
    from clipforge.caption.vocab import build_vocab
    from clipforge.data.decode import decode_image
    from clipforge.models.encode import embed_pixels

    names = list(fixtures.COLORS)
    pixels = [
        model.preprocess(decode_image(fixtures._jpeg(fixtures.COLORS[n], s))) for s in range(4) for n in names
    ]
    texts = [CAPTIONS[n] for _ in range(4) for n in names]
    cond = torch.from_numpy(embed_pixels(model, torch.stack(pixels))).float()
    vocab = build_vocab(texts, min_count=1)
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=len(vocab), cond_dim=model.config.embed_dim, width=32, heads=2, layers=1, prefix_len=2,
        dropout=0.0, max_len=16,
    )  # fmt: skip
    dec = CaptionDecoder(cfg)
    tokens = pad_tokens(vocab.encode(texts), vocab.pad_id)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    dec.train()
    for _ in range(steps):
        loss = caption_loss(dec, cond, tokens, vocab.pad_id, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = {
        "mode": "paired",
        "encoder": {
            "model": model.config.spec, "model_opts": {}, "condition": "embedding",
            "fingerprint": encoder_fingerprint(model, "embedding"),
        },
    }  # fmt: skip
    return Captioner(dec.eval(), vocab, meta)


@pytest.fixture(scope="session")
def tiny_captioner(tiny_model_serve):
    return train_tiny_captioner(tiny_model_serve)


@pytest.fixture(scope="session")
def captioner_dir(tmp_path_factory, tiny_captioner) -> Path:
    return tiny_captioner.save(tmp_path_factory.mktemp("captioner") / "cap")


def _make_caption_server(model, captioner, index_dir=None, **cfg):
    from clipforge.index import ClipIndex
    from clipforge.serve.app import create_app
    from clipforge.serve.server import ServerThread
    from clipforge.serve.service import ClipService, ServeConfig

    index = ClipIndex.load(index_dir) if index_dir is not None else None
    return ServerThread(create_app(ClipService(model, index, ServeConfig(**cfg), captioner=captioner)))


@pytest.fixture(scope="module")
def caption_url(tiny_model_serve, tiny_captioner):
    with _make_caption_server(
        tiny_model_serve, tiny_captioner, max_upload_bytes=200_000, max_image_pixels=1_000_000
    ) as url:
        yield url


# Test modules get these through fixtures, not `from conftest import`: several test dirs have a conftest.py,
# and in one pytest session the module name "conftest" may be another dir's.
@pytest.fixture(scope="session")
def make_caption_server():
    """make_caption_server(model, captioner, index_dir=None, **ServeConfig fields) -> ServerThread."""
    return _make_caption_server


@pytest.fixture(scope="session")
def captioner_trainer():
    """train_tiny_captioner(model, steps=150) -> Captioner (colour -> "a <colour> square")."""
    return train_tiny_captioner


@pytest.fixture(scope="session")
def colour_jpeg():
    """colour_jpeg("red", seed=7) -> JPEG bytes of a noisy square of that colour; .captions: the targets."""

    def make(name: str, seed: int = 7) -> bytes:
        return fixtures._jpeg(fixtures.COLORS[name], seed)

    make.captions = CAPTIONS
    return make


@pytest.fixture(scope="session")
def tiny_clip_class():
    return fixtures.TinyClip


@pytest.fixture(scope="session")
def shard_writer():
    """write_shard(path, n, prefix=..., start=..., corrupt=()) from the index test helpers."""
    return write_shard
