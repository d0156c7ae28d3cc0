"""Fixture models: deterministic, cached by config hash, built once under concurrency (file
lock + rename), saved as safetensors (single and sharded), and no network access is attempted
while building and loading them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures.models import FAMILIES, cache_root, repo_root, tiny_model_dir  # noqa: E402

WORKER = textwrap.dedent(
    """
    import json, logging, socket, sys
    attempts = []
    class NetworkBlocked(OSError):
        pass
    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise NetworkBlocked("network access attempted: " + repr(args)[:200])
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.getaddrinfo = refuse
    socket.create_connection = refuse
    # the guard works: a deliberate connection is refused and counted
    try:
        socket.create_connection(("127.0.0.1", 9))
    except NetworkBlocked:
        pass
    guard_ok = len(attempts) == 1
    attempts.clear()

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    built = []
    class Spy(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("building fixture model"):
                built.append(record.getMessage())
    logging.getLogger("fixtures.models").addHandler(Spy())

    from fixtures.models import tiny_model_dir
    path = tiny_model_dir("gpt2", sharded=True)
    from splitlearn import ModelFactory
    from transformers import AutoModelForCausalLM
    parts = ModelFactory.create_split_models("gpt2", path, 1, 3, low_memory=True)
    full = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    print("RESULT " + json.dumps({"path": str(path), "built": len(built), "attempts": attempts, "guard_ok": guard_ok}))
    """
)


def test_build_once_concurrently_without_network(tmp_path):
    """Two fresh interpreters build the same fixture into an empty cache at once, with every
    socket connection refused: one builds, the other waits on the lock and reuses it; both load
    it through splitlearn and transformers; nobody touches the network; the bytes match the
    regular cache's build (determinism)."""
    env = dict(os.environ, SPLITREPRO_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_ENABLE_HF_TRANSFER", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:]))
    assert all(r["guard_ok"] for r in results)
    assert [r["attempts"] for r in results] == [[], []]
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["built"] for r in results) == [0, 1]
    root = tmp_path / "cache" / "models"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    fresh = root / os.path.basename(results[0]["path"])
    regular = tiny_model_dir("gpt2", sharded=True)
    assert fresh.name == regular.name  # same config hash
    for f in sorted(regular.glob("*.safetensors")):
        assert (fresh / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("family", FAMILIES)
def test_layouts(family):
    single = tiny_model_dir(family)
    sharded = tiny_model_dir(family, sharded=True)
    assert single != sharded and single.parent == sharded.parent == cache_root()
    assert tiny_model_dir(family) == single  # cached
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == shards
    assert not list(single.glob("*.bin")) and not list(sharded.glob("*.bin"))
    cfg = json.loads((single / "config.json").read_text())
    assert cfg["model_type"] == family


def test_gemma_fixture_drops_tied_head_and_sets_head_dim():
    from safetensors import safe_open

    d = tiny_model_dir("gemma")
    with safe_open(str(d / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert json.loads((d / "config.json").read_text())["head_dim"] == 16


def test_unknown_family():
    with pytest.raises(ValueError, match="gpt2, qwen2, gemma"):
        tiny_model_dir("llama")


def test_built_elsewhere_builds_in_another_interpreter():
    """The same directory as an in-process build, and this process never ran the build: a
    scenario that measures its first Hugging Face load stays cold (manager_lock:cold_real)."""
    from fixtures.models import built_elsewhere

    code = textwrap.dedent(
        """
        import sys
        from fixtures.models import built_elsewhere
        path = built_elsewhere("tiny_model_dir", family="gpt2", sharded=True)
        print(path, "transformers.models.gpt2.modeling_gpt2" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=str(repo_root()))
    assert out.returncode == 0, out.stderr
    path, warmed = out.stdout.split()
    assert path == str(tiny_model_dir("gpt2", sharded=True)) and warmed == "False"
    with pytest.raises(ValueError, match="unknown builder"):
        built_elsewhere("os.system")
