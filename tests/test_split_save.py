"""Parts save as safetensors + config json + split metadata (no pickle) and load back equal."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from fixtures.reference import split_parts  # noqa: E402
from splitlearn import ConfigMismatch, CorruptWeights, ModelNotFound, SplitLearnError  # noqa: E402
from splitlearn.models.base import SplitPart  # noqa: E402
from splitlearn.models.registry import ModelRegistry  # noqa: E402


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma"])
def test_save_and_load_each_part(tmp_path, family):
    parts = split_parts(family, 1, 3)
    ids = torch.tensor([[4, 9, 16, 25]])
    with torch.no_grad():
        h1 = parts[0](ids).hidden_states
        h2 = parts[1](h1).hidden_states
        ref = parts[2](h2).logits
    loaded = []
    for part in parts:
        d = part.save_pretrained(tmp_path / part.part)
        files = sorted(p.name for p in d.iterdir())
        assert files == ["config.json", "model.safetensors", "split_config.json"]
        meta = json.loads((d / "split_config.json").read_text())
        assert (meta["family"], meta["part"]) == (family, part.part)
        again = type(part).from_saved(d)
        assert again.training is False
        sd, sd2 = part.state_dict(), again.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        loaded.append(again)
    with torch.no_grad():
        logits = loaded[2](loaded[1](loaded[0](ids).hidden_states).hidden_states).logits
    torch.testing.assert_close(logits, ref, atol=0, rtol=0)


def test_base_class_dispatches_on_metadata(tmp_path):
    top = split_parts("gemma", 1, 3)[2]
    d = top.save_pretrained(tmp_path / "top")
    again = SplitPart.from_saved(d)
    assert type(again) is ModelRegistry.get_model_class("gemma", "top")
    # the tied head of a Gemma top is saved in the part (it has no embedding to take it from)
    assert torch.equal(again.lm_head.weight, top.lm_head.weight)


def test_loading_as_wrong_part_is_refused(tmp_path):
    trunk = split_parts("gpt2", 1, 3)[1]
    d = trunk.save_pretrained(tmp_path / "trunk")
    with pytest.raises(ConfigMismatch, match="gpt2 trunk part, not a gpt2 top"):
        ModelRegistry.get_model_class("gpt2", "top").from_saved(d)


def test_missing_and_corrupt_saved_parts(tmp_path):
    trunk_cls = ModelRegistry.get_model_class("qwen2", "trunk")
    with pytest.raises(ModelNotFound, match="does not exist"):
        trunk_cls.from_saved(tmp_path / "nope")
    d = split_parts("qwen2", 1, 3)[1].save_pretrained(tmp_path / "trunk")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptWeights, match="model.safetensors"):
        trunk_cls.from_saved(d)


@pytest.mark.parametrize(
    "raised",
    [
        FileNotFoundError("No such file or directory"),  # how safetensors 0.8 reports EACCES / EMFILE
        PermissionError(13, "Permission denied"),
        MemoryError("cannot allocate"),
    ],
    ids=["safetensors-open-error", "EACCES", "allocation"],
)
def test_saved_part_that_cannot_be_read_is_a_load_error_not_corrupt_weights(tmp_path, monkeypatch, raised):
    """As for checkpoints (ShardLoader, the factory's traditional path): a saved part whose file
    cannot be opened or whose tensors cannot be allocated is a ModelLoadError with the cause
    chained; CorruptWeights is kept for a file safetensors rejects (see the test above)."""
    import safetensors

    from splitlearn.errors import ModelLoadError

    d = split_parts("qwen2", 1, 3)[1].save_pretrained(tmp_path / "trunk")

    def refuse(*_a, **_k):
        raise raised

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    with pytest.raises(SplitLearnError) as info:
        ModelRegistry.get_model_class("qwen2", "trunk").from_saved(d)
    assert type(info.value) is ModelLoadError, repr(info.value)
    assert "model.safetensors" in str(info.value)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: "{not json", "JSONDecodeError"),
        (lambda m: "[]", "expected a JSON object"),
        (lambda m: {**m, "format_version": 99}, "format_version 99"),
        (lambda m: {k: v for k, v in m.items() if k != "start_layer"}, "'start_layer' must be an integer"),
        (lambda m: {**m, "end_layer": "3"}, "'end_layer' must be an integer"),
        (lambda m: {**m, "family": None}, "'family' must be a string"),
    ],
    ids=["not-json", "not-an-object", "newer-format", "field-missing", "field-not-int", "family-not-str"],
)
def test_a_malformed_split_config_is_a_load_error_naming_the_file(tmp_path, edit, match):
    """It was a bare JSONDecodeError, KeyError or TypeError from deep in from_saved."""
    import json

    from splitlearn.errors import ModelLoadError

    d = split_parts("qwen2", 1, 3)[1].save_pretrained(tmp_path / "trunk")
    meta_path = d / "split_config.json"
    new = edit(json.loads(meta_path.read_text()))
    meta_path.write_text(new if isinstance(new, str) else json.dumps(new))
    for cls in (SplitPart, ModelRegistry.get_model_class("qwen2", "trunk")):
        with pytest.raises(ModelLoadError, match=match) as info:
            cls.from_saved(d)
        assert "split_config.json" in str(info.value)


def test_a_saved_part_without_a_readable_config_is_a_split_error_naming_it(tmp_path):
    """config.json gone is ModelNotFound, as for the other two files; one that is not JSON is a
    ConfigMismatch, as the factory reports it; neither is a bare transformers error."""
    d = split_parts("qwen2", 1, 3)[1].save_pretrained(tmp_path / "trunk")
    config_path = d / "config.json"
    text = config_path.read_text()
    config_path.unlink()
    for cls in (SplitPart, ModelRegistry.get_model_class("qwen2", "trunk")):
        with pytest.raises(ModelNotFound, match="config.json"):
            cls.from_saved(d)
    config_path.write_text(text[: len(text) // 2])
    for cls in (SplitPart, ModelRegistry.get_model_class("qwen2", "trunk")):
        with pytest.raises(ConfigMismatch, match="config"):
            cls.from_saved(d)
    config_path.write_text(text)
    assert type(SplitPart.from_saved(d)).__name__ == "Qwen2TrunkModel"


_SAVE_OVER_PROGRAM = r"""
import os, sys, torch
from fixtures.reference import split_parts
from splitlearn.models.base import SplitPart

d = sys.argv[1]
_, trunk, top = split_parts("gpt2", 1, 3)
trunk.save_pretrained(d)
loaded = SplitPart.from_saved(d)  # its weights map d/model.safetensors
before = {k: v.clone() for k, v in loaded.state_dict().items()}
top.save_pretrained(d)  # another, smaller part saved over it
assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items()), "the loaded part's weights changed"
again = SplitPart.from_saved(d)
assert again.part == "top" and all(torch.equal(v, top.state_dict()[k]) for k, v in again.state_dict().items())
assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "split_config.json"], os.listdir(d)
print("ok")
"""


def test_saving_over_the_directory_a_part_was_loaded_from_leaves_that_part_whole(tmp_path):
    """A part loaded by from_saved maps its weights file (a file truncated under it kills the
    process with SIGBUS at its next read: checked by hand). Saving another, smaller part over the
    same directory is safe because safetensors' save_file writes a new file (a new inode) instead
    of rewriting the old one in place; this guards that, for the workflow "load, train, save
    back". In a fresh interpreter: a SIGBUS must not take pytest down."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _SAVE_OVER_PROGRAM, str(tmp_path / "part")],
        cwd=root, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.strip().endswith("ok")
