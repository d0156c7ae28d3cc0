"""ModelFactory: the incremental path gives the same parts as the traditional one, reading only
the shards (and tensors) the requested parts need; load_split_model; part selection."""

from __future__ import annotations

import json
import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from fixtures.models import tiny_model_dir  # noqa: E402
from fixtures.reference import full_model  # noqa: E402
from splitlearn import ModelFactory, load_split_model  # noqa: E402
from splitlearn.loading import ShardLoader  # noqa: E402

SPLITS = {"gpt2": (2, 4), "qwen2": (1, 4), "gemma": (1, 3)}


def assert_same_part(a, b):
    assert type(a) is type(b)
    assert (a.start_layer, a.end_layer) == (b.start_layer, b.end_layer)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma"])
@pytest.mark.parametrize("sharded", [True, False])
def test_incremental_equals_traditional(family, sharded):
    path = tiny_model_dir(family, sharded)
    s1, s2 = SPLITS[family]
    inc = ModelFactory.create_split_models(family, path, s1, s2, low_memory=True)
    assert ModelFactory.last_load_info()["mode"] == "incremental"
    trad = ModelFactory.create_split_models(family, path, s1, s2, low_memory=False)
    assert ModelFactory.last_load_info()["mode"] == "traditional"
    for a, b in zip(inc, trad, strict=False):
        assert not a.training and not b.training
        assert_same_part(a, b)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        logits = inc[2](inc[1](inc[0](ids).hidden_states).hidden_states).logits
        ref = full_model(family)(ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def expected_shards(path, prefixes):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted({f for k, f in index.items() if k.startswith(prefixes)}), sorted(set(index.values())), index


def test_trunk_opens_only_its_shards(monkeypatch, caplog):
    path = tiny_model_dir("gpt2", sharded=True)
    want, all_files, index = expected_shards(path, ("transformer.h.2.", "transformer.h.3."))
    read = []
    original = ShardLoader.get_tensor
    monkeypatch.setattr(ShardLoader, "get_tensor", lambda self, key, *a: read.append(key) or original(self, key, *a))
    with caplog.at_level(logging.INFO, logger="splitlearn"):
        bottom, trunk, top = ModelFactory.create_split_models("gpt2", path, 2, 4, parts=("trunk",))
    info = ModelFactory.last_load_info()
    print("opened", info["opened_files"], "of", all_files)
    assert bottom is None and top is None and len(trunk.layers) == 2
    assert info["mode"] == "incremental"  # low_memory=None + sharded checkpoint
    assert sorted(info["opened_files"]) == want
    assert set(want) < set(all_files)
    assert index["transformer.wte.weight"] not in want  # the embedding's shard was never opened
    assert read and all(k.startswith(("transformer.h.2.", "transformer.h.3.")) for k in read)
    assert trunk.load_info["opened_files"] == info["opened_files"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "stage start: build trunk" in messages and "stage done: build trunk" in messages


def test_single_file_defaults_to_traditional_and_incremental_works():
    path = tiny_model_dir("qwen2", sharded=False)
    ModelFactory.create_split_models("qwen2", path, 1, 4, parts=("top",))
    assert ModelFactory.last_load_info()["mode"] == "traditional"
    _, _, top = ModelFactory.create_split_models("qwen2", path, 1, 4, parts=("top",), low_memory=True)
    info = ModelFactory.last_load_info()
    assert info["mode"] == "incremental" and info["opened_files"] == ["model.safetensors"]
    assert len(top.layers) == 2


def test_load_split_model_quickstart():
    path = tiny_model_dir("gemma", sharded=True)
    bottom, trunk, top = load_split_model("gemma", (1, 3), path, device="cpu")
    assert [len(p.layers) for p in (bottom, trunk, top)] == [1, 2, 1]
    assert all(next(p.parameters()).device.type == "cpu" for p in (bottom, trunk, top))


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_dtype_conversion_same_on_both_paths(family):
    path = tiny_model_dir(family, sharded=True)
    inc = ModelFactory.create_split_models(family, path, 1, 3, dtype=torch.bfloat16, low_memory=True)
    trad = ModelFactory.create_split_models(family, path, 1, 3, dtype=torch.bfloat16, low_memory=False)
    for a, b in zip(inc, trad, strict=True):
        assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
        assert_same_part(a, b)


def test_base_model_checkpoint_without_prefix():
    """Checkpoints of the bare base model (``h.0.*``, ``wte.weight``) load the same parts."""
    from splitlearn.models.registry import ModelRegistry

    full = full_model("gpt2")
    state = full.state_dict()
    bare = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
    for part, rng in (("bottom", (0, 2)), ("trunk", (2, 4)), ("top", (4, None))):
        cls = ModelRegistry.get_model_class("gpt2", part)
        assert_same_part(
            cls.from_pretrained_split(bare, full.config, *rng), cls.from_pretrained_split(state, full.config, *rng)
        )
