"""FSDP2 (``--fsdp``): which modules get sharded, that sharded grads / clipping / checkpoints equal the
plain ones, and that 2 gloo CPU processes with FSDP train exactly like 1 plain process (same global
batch), with checkpoints that resume across FSDP and plain runs in both directions."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_model import make_tiny_scratch, torchrun_train
from torch.distributed.tensor import DTensor

from clipforge.train import checkpoint as ckpt
from clipforge.train.dist import all_reduce_grads, shard_model
from clipforge.train.loss import build_loss
from clipforge.train.optim import build_optimizer, clip_grad
from clipforge.train.step import forward_backward


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group: FSDP's hooks, DTensors and state-dict gathers all run, in-process."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _towers():
    from clipforge.models import load_model

    return load_model(  # efficientnet entered through prefix()/rest(); MiniLM partly unlocked
        "towers:efficientnet-lite0+minilm-l6", unlock_image=-1, unlock_text=2, image_size=64, image_head="mlp"
    )


SCRATCH_SHARDED = [
    "hf.vision_model.encoder.layers.0",
    "hf.vision_model.encoder.layers.1",
    "hf.vision_model",
    "hf.text_model.encoder.layers.0",
    "hf.text_model.encoder.layers.1",
    "hf.text_model",
]
TOWERS_SHARDED = [
    *(f"image_tower.net._blocks.{i}" for i in range(16)),
    "image_tower",
    "text_tower.model.encoder.layer.4",  # the 2 unlocked layers only: the frozen prefix stays plain
    "text_tower.model.encoder.layer.5",
]


@pytest.mark.parametrize(
    "make,expected",
    [
        (make_tiny_scratch, SCRATCH_SHARDED),
        pytest.param(_towers, TOWERS_SHARDED, marks=pytest.mark.slow),
    ],
    ids=["scratch", "towers"],
)
def test_sharded_step_and_checkpoint_match_plain(make, expected, one_rank_group, tmp_path):
    plain = make()
    init = copy.deepcopy(plain)
    model = copy.deepcopy(plain)
    assert shard_model(model, torch.device("cpu")) == expected
    sharded = {n for n, p in model.named_parameters() if isinstance(p, DTensor)}
    replicated = {n for n, p in model.named_parameters() if p.requires_grad} - sharded
    assert replicated and all("proj" in n or n.startswith("logit_") for n in replicated)  # heads, scale

    torch.manual_seed(1)
    size = plain.config.preprocess["size"]
    batch = {
        "image": {"pixels": torch.randn(8, 3, size, size)},
        "text": plain.tokenize([f"a photo of {w} things" for w in "abcdefgh"]),
    }
    loss_fn = build_loss("clip", True)
    opts = [build_optimizer(m, 1e-3, 0.1) for m in (plain, model)]
    for m, opt in zip((plain, model), opts):
        m.train()
        torch.manual_seed(2)  # the same dropout masks
        loss = forward_backward(m, loss_fn, batch, accum=2)  # GradCache: re-forwards + many backwards
        all_reduce_grads([p for p in m.parameters() if p.requires_grad], 1)
        m.gnorm = clip_grad([p for p in m.parameters() if p.requires_grad], 0.5)
        opt.step()
        m.loss = float(loss)
    assert model.loss == pytest.approx(plain.loss, rel=1e-6)
    assert model.gnorm == pytest.approx(plain.gnorm, rel=1e-5) and plain.gnorm > 0.5  # it clipped
    params = dict(model.named_parameters())
    for n, p in plain.named_parameters():
        assert torch.allclose(_full(params[n].detach()), p.detach(), atol=1e-6), n

    weights, osd = ckpt.gather_full_state(model, opts[1])
    ref = opts[0].state_dict()
    assert weights.keys() == plain.state_dict().keys()
    assert osd["param_groups"] == ref["param_groups"]
    for i, st in ref["state"].items():
        for k, v in st.items():
            assert torch.allclose(osd["state"][i][k], v, atol=1e-6), (i, k)

    # the sharded model's checkpoint has the plain one's layout (shared tensors stored once)
    path = ckpt.save_checkpoint(tmp_path / "ck", 1, plain, opts[0], {}, [ckpt.rng_state()])
    path_f = ckpt.save_checkpoint(
        tmp_path / "ckf", 1, model, opts[1], {}, [ckpt.rng_state()], full=(weights, osd)
    )
    for name in ("model.safetensors", "optimizer.safetensors"):
        with safe_open(str(path / name), "pt") as a, safe_open(str(path_f / name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata(), name
            for k in a.keys():
                assert torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-6), k
    state, state_f = (json.loads((c / "state.json").read_text()) for c in (path, path_f))
    assert state["optimizer"] == state_f["optimizer"]

    # a plain checkpoint loads into a sharded model: weights and AdamW moments
    shard_model(init, torch.device("cpu"))
    init_opt = build_optimizer(init, 1e-3, 0.1)
    ckpt.load_checkpoint(path, init, init_opt, 0)
    w2, o2 = ckpt.gather_full_state(init, init_opt)
    for k, v in plain.state_dict().items():
        assert torch.equal(w2[k], v), k
    for i, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(o2["state"][i][k], v), (i, k)


def _launch(out: Path, shards: list[str], env: dict, nproc: int, extra: list[str]) -> list[dict]:
    args = ["--steps", "8", "--save-every", "4", "--batch-size", "16", "--lr", "2e-3", "--grad-clip", "0.5"]
    return torchrun_train(out, "py:tiny_model:make_tiny_scratch", shards, env, nproc, [*args, *extra])


def _resume_from(src: Path, dst: Path) -> None:
    """``dst`` starts as a run killed right after writing ``src`` (a step-4 checkpoint)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src, dst / "checkpoints" / src.name)
    (dst / "checkpoints" / "latest").write_text(src.name + "\n")


def _assert_same_weights(a: Path, b: Path, tol: float = 1e-4) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k].float() - wb[k].float()).abs().max() < tol, k


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_across(flickr_slice, tmp_path, sub_env):
    plain = _launch(tmp_path / "plain", flickr_slice, sub_env, 1, [])
    fsdp = _launch(tmp_path / "fsdp", flickr_slice, sub_env, 2, ["--fsdp", "--accum", "2"])
    assert [r["step"] for r in fsdp] == list(range(1, 9))
    loss_p, loss_f = [r["loss"] for r in plain], [r["loss"] for r in fsdp]
    assert loss_f == pytest.approx(loss_p, rel=1e-4, abs=1e-5)
    assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-4)
    assert loss_p[-1] < loss_p[0]  # it learns
    _assert_same_weights(
        tmp_path / "plain/model/model.safetensors", tmp_path / "fsdp/model/model.safetensors"
    )

    # an FSDP checkpoint has the plain layout: same weight and optimizer keys, same param groups
    ck_p, ck_f = tmp_path / "plain/checkpoints/step-0000004", tmp_path / "fsdp/checkpoints/step-0000004"
    _assert_same_weights(ck_p / "model.safetensors", ck_f / "model.safetensors")
    _assert_same_weights(ck_p / "optimizer.safetensors", ck_f / "optimizer.safetensors")
    groups = [json.loads((c / "state.json").read_text())["optimizer"] for c in (ck_p, ck_f)]
    assert groups[0] == groups[1]

    # FSDP checkpoint -> plain run, and plain checkpoint -> FSDP run: both finish like the plain run
    _resume_from(ck_f, tmp_path / "to_plain")
    to_plain = _launch(tmp_path / "to_plain", flickr_slice, sub_env, 1, ["--resume"])
    _resume_from(ck_p, tmp_path / "to_fsdp")
    to_fsdp = _launch(tmp_path / "to_fsdp", flickr_slice, sub_env, 2, ["--fsdp", "--resume"])
    for rows, name in ((to_plain, "to_plain"), (to_fsdp, "to_fsdp")):
        assert [r["step"] for r in rows] == [5, 6, 7, 8]
        assert [r["loss"] for r in rows] == pytest.approx(loss_p[4:], rel=1e-4, abs=1e-5)
        _assert_same_weights(
            tmp_path / "plain/model/model.safetensors", tmp_path / name / "model/model.safetensors"
        )
