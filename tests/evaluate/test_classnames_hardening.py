"""Hardening of evaluation inputs.

``load_classnames``: a name's position is its label, so a non-string JSON entry (crashed on
``n.replace``), a blank name (was dropped, shifting every later label) and a repeated name (two
identical zero-shot classes: silently wrong accuracy) are ConfigErrors naming the file and the entry.

``blindlm.load_lm``: goes through ``caption.llm.load_causal_lm``, so an untrusted ``--llm`` dir's
pickled ``pytorch_model.bin`` is never unpickled and any loader failure is a clear ValueError.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from clipforge.config import ConfigError
from clipforge.evaluate import blindlm
from clipforge.evaluate.zeroshot import load_classnames

CIFAR = Path("/work/shared/data/cifar10/classnames.txt")


def _write(tmp_path: Path, name: str, content: object) -> Path:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return p


def test_plain_files_still_load(tmp_path: Path) -> None:
    assert load_classnames(_write(tmp_path, "a.txt", "cat\n  sea_lion \ndog\n\n\n")) == [
        "cat",
        "sea lion",
        "dog",
    ]
    assert load_classnames(_write(tmp_path, "b.json", ["cat", " dog ", "sea_lion"])) == [
        "cat",
        "dog",
        "sea lion",
    ]
    if CIFAR.is_file():  # the shipped data set's format: one name per line, trailing newline
        assert len(load_classnames(CIFAR)) == 10


@pytest.mark.parametrize(
    "content, match",
    [
        (["cat", 3, "dog"], r"entry 1 \(label 1\) '3' is a int, not a string"),
        (["cat", None], r"entry 1 .* NoneType, not a string"),
        (["cat", ["dog"]], r"entry 1 .* list, not a string"),
        ({"0": "cat"}, "expected a JSON list"),
        (["cat", "   "], r"entry 1 .* is blank"),
        (["cat", "dog", "Dog "], r"entry 2 .* repeats label 1"),
        (["sea lion", "sea_lion"], r"entry 1 .* repeats label 0"),
    ],
)
def test_bad_json_entries_name_file_and_entry(tmp_path: Path, content: object, match: str) -> None:
    p = _write(tmp_path, "names.json", content)
    with pytest.raises(ConfigError, match=match) as e:
        load_classnames(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("cat\n   \ndog\n", r"line 2 \(label 1\) .* is blank"),  # was skipped: dog became label 1
        ("\ncat\ndog\n", r"line 1 \(label 0\) .* is blank"),
        ("cat\ndog\ncat\n", r"line 3 \(label 2\) 'cat' repeats label 0"),
        ("\n\n", "no class names"),
    ],
)
def test_bad_text_lines_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    p = _write(tmp_path, "names.txt", text)
    with pytest.raises(ConfigError, match=match) as e:
        load_classnames(p)
    assert str(p) in str(e.value)


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    bad_json = _write(tmp_path, "n.json", '["cat",')
    with pytest.raises(ConfigError, match="n.json"):
        load_classnames(bad_json)
    latin1 = tmp_path / "n.txt"
    latin1.write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="n.txt"):
        load_classnames(latin1)


# -- blindlm.load_lm: the one safe --llm loader --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "caption"))
    from llm_testutils import tiny_llm

    return tiny_llm(tmp_path_factory.mktemp("llm") / "lm")


def test_load_lm_scores_in_float32(tiny_llm_dir: Path) -> None:
    import torch

    lm = blindlm.load_lm(str(tiny_llm_dir), batch_size=4)
    assert next(lm.model.parameters()).dtype == torch.float32 and not lm.model.training
    assert lm.fingerprint and lm.logprob(["a dog", "a red ball"]).shape == (2,)


def test_load_lm_never_unpickles_a_bin(tiny_llm_dir: Path, tmp_path: Path) -> None:
    """A dir with only pytorch_model.bin (a pickle: may run code when loaded) is refused unread."""
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_llm_dir, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot load a causal LM"):
        blindlm.load_lm(str(d))


def test_load_lm_turns_any_loader_failure_into_value_error(tiny_llm_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "garbage"
    shutil.copytree(tiny_llm_dir, d)
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")  # SafetensorError
    with pytest.raises(ValueError, match=f"--llm {d}: cannot load a causal LM"):
        blindlm.load_lm(str(d))
    with pytest.raises(FileNotFoundError):
        blindlm.load_lm(str(tmp_path / "none"))
