"""ShardLoader error classes: a file safetensors rejects is CorruptWeights; a file that cannot be
opened (permissions, no file descriptors left) or a tensor that cannot be allocated is a
ModelLoadError carrying the real cause, never reported as a corrupt file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures.models import tiny_model_dir  # noqa: E402
from splitlearn.errors import CorruptWeights, MissingShard  # noqa: E402
from splitlearn.loading import ShardLoader  # noqa: E402
from splitlearn.model_loader import ModelLoadError  # noqa: E402

_UNPRIVILEGED = "SPLITREPRO_TEST_UNPRIVILEGED"


def rerun_without_dac_override(request) -> None:
    """For a test that needs file permissions to hold and finds that they do not (root): run the
    same test again in a pytest child that has lost CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    (util-linux ``setpriv``), in which a mode-000 file is unreadable to its owner, root
    included; the child must pass it. Skips where setpriv is missing or the child cannot drop
    them (a container without CAP_SETPCAP)."""
    if os.environ.get(_UNPRIVILEGED):
        pytest.fail("chmod 000 still does not stop this user from reading after the capabilities were dropped")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("chmod 000 does not stop this user from reading (root), and there is no setpriv to drop that")
    # from the bounding set and the inheritable one: a container that hands root inheritable
    # capabilities would otherwise let them survive the exec
    caps = "-dac_override,-dac_read_search"
    drop = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    root = request.config.rootpath
    # the probe, where the test will run: the repository readable, a mode-000 file not
    locked = request.getfixturevalue("tmp_path") / "probe-000"
    locked.write_text("x")
    locked.chmod(0)
    check = (
        "import sys\n"
        "open('conftest.py').close()\n"
        "try:\n    open(sys.argv[1]).close()\nexcept PermissionError:\n    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    try:
        probe = subprocess.run(
            [*drop, sys.executable, "-c", check, str(locked)], cwd=root, capture_output=True, text=True, timeout=60
        )
    finally:
        locked.chmod(0o600)
    if probe.returncode == 3:
        pytest.skip("chmod 000 does not stop this user from reading (root), even with the capabilities dropped")
    if probe.returncode != 0:
        pytest.skip(f"chmod 000 does not stop this user from reading (root), and setpriv cannot drop that: {probe.stderr[-300:]}")
    proc = subprocess.run(
        [*drop, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", request.node.nodeid],
        cwd=root,
        env={**os.environ, _UNPRIVILEGED: "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def made_unreadable(request, *paths) -> bool:
    """Mode 000 on ``paths`` until the test ends (a finalizer gives them 0o644 back). False when
    that does not stop this user from reading them (root): the test has then been run again in
    a child without the capabilities that allow it (:func:`rerun_without_dac_override`), and
    the caller returns."""
    for p in paths:
        p.chmod(0)
    request.addfinalizer(lambda: [p.chmod(0o644) for p in paths])
    if os.access(paths[0], os.R_OK):
        rerun_without_dac_override(request)
        return False
    return True


def copy_model(tmp_path, sharded=True):
    dst = tmp_path / ("sharded" if sharded else "single")
    shutil.copytree(tiny_model_dir("gpt2", sharded), dst)
    return dst


def a_shard_and_key(loader):
    fname = loader.files[0]
    key = next(k for k, f in loader.weight_map.items() if f == fname)
    return fname, key


def test_truncated_shard_is_still_corrupt_weights(tmp_path):
    model = copy_model(tmp_path)
    loader = ShardLoader(model)
    fname, key = a_shard_and_key(loader)
    path = model / fname
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptWeights, match="not a valid safetensors file"):
        loader.get_tensor(key)


def test_unreadable_shard_is_a_load_error_not_corrupt_weights(tmp_path, request):
    model = copy_model(tmp_path)
    loader = ShardLoader(model)
    fname, key = a_shard_and_key(loader)
    if not made_unreadable(request, model / fname):
        return
    with pytest.raises(ModelLoadError, match=r"PermissionError.*Permission denied") as info:
        loader.get_tensor(key)
    assert not isinstance(info.value, CorruptWeights)
    assert isinstance(info.value.__cause__, PermissionError)


_EMFILE_PROGRAM = r"""
import json, os, resource, sys
import safetensors  # noqa: F401 - imported before the descriptors run out
from splitlearn.loading import ShardLoader
loader = ShardLoader(sys.argv[1])
fname = loader.files[0]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
fds = []
try:
    while True:
        fds.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    loader._handle(fname)
    out = {"raised": None}
except Exception as exc:
    out = {"raised": type(exc).__name__, "message": str(exc), "cause": type(exc.__cause__).__name__,
           "errno": getattr(exc.__cause__, "errno", None)}
for fd in fds:
    os.close(fd)
print("RESULT " + json.dumps(out))
"""


def test_no_file_descriptors_left_is_a_load_error_not_corrupt_weights(tmp_path):
    """EMFILE, for real: safetensors itself reports it as "No such file or directory". In a
    child process, so that no other thread of the test run meets the exhausted descriptor table."""
    model = copy_model(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _EMFILE_PROGRAM, str(model)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT ") :])
    assert result["raised"] == "ModelLoadError", result
    assert result["cause"] == "OSError" and result["errno"] == 24, result
    assert "Too many open files" in result["message"], result


def test_shard_deleted_after_the_index_was_read_is_missing_shard(tmp_path):
    model = copy_model(tmp_path)
    loader = ShardLoader(model)
    fname, key = a_shard_and_key(loader)
    (model / fname).unlink()
    with pytest.raises(MissingShard, match=fname):
        loader.get_tensor(key)


def test_allocation_failure_while_converting_is_a_load_error(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    loader = ShardLoader(copy_model(tmp_path, sharded=False))
    key = next(iter(loader.weight_map))

    def no_memory(self, *args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(torch.Tensor, "to", no_memory)
    with pytest.raises(ModelLoadError, match=r"as torch.float16: RuntimeError: .*can't allocate memory") as info:
        loader.get_tensor(key, dtype=torch.float16)
    assert not isinstance(info.value, CorruptWeights)
    assert isinstance(info.value.__cause__, RuntimeError)
    monkeypatch.undo()
    assert loader.get_tensor(key, dtype=torch.float16).dtype == torch.float16  # the file itself is fine


def test_index_naming_a_tensor_its_shard_lacks_is_corrupt_weights(tmp_path):
    model = copy_model(tmp_path)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fname = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["transformer.no_such_tensor"] = fname
    index_path.write_text(json.dumps(index))
    loader = ShardLoader(model)
    with pytest.raises(CorruptWeights, match="no_such_tensor"):
        loader.shape("transformer.no_such_tensor")
    with pytest.raises(CorruptWeights, match="no_such_tensor"):
        loader.get_tensor("transformer.no_such_tensor")


def test_unreadable_shard_reported_by_the_factory_as_such(tmp_path, request):
    """Through the public entry point, as a non-root user would see it (as root: in a child that
    has dropped the capabilities that let root read a mode-000 file)."""
    pytest.importorskip("torch")
    from splitlearn import ModelFactory

    model = copy_model(tmp_path)
    if not made_unreadable(request, *sorted(model.glob("*.safetensors"))):
        return
    with pytest.raises(ModelLoadError, match="Permission denied"):
        ModelFactory.create_split_models("gpt2", str(model), 1, 3, low_memory=True, parts=("trunk",))


def test_unreadable_index_is_a_load_error_not_corrupt_weights(tmp_path, request):
    """An index json that cannot be opened says nothing about the checkpoint's contents: a
    ModelLoadError with the OS error chained, as for a shard (a malformed index stays corrupt)."""
    model = copy_model(tmp_path)
    if not made_unreadable(request, model / "model.safetensors.index.json"):
        return
    with pytest.raises(ModelLoadError, match=r"index\.json.*Permission denied") as info:
        ShardLoader(model)
    assert not isinstance(info.value, CorruptWeights)
    assert isinstance(info.value.__cause__, PermissionError)


def test_unreadable_config_is_a_load_error_not_a_config_mismatch(tmp_path, request):
    """A config.json the process may not read is not a config that disagrees with the weights."""
    pytest.importorskip("torch")
    from splitlearn import ModelFactory
    from splitlearn.errors import ConfigMismatch

    model = copy_model(tmp_path)
    if not made_unreadable(request, model / "config.json"):
        return
    with pytest.raises(ModelLoadError, match=r"Permission denied.*config\.json") as info:
        ModelFactory.create_split_models("gpt2", str(model), 1, 3, parts=("trunk",))
    assert not isinstance(info.value, ConfigMismatch)
    assert isinstance(info.value.__cause__, PermissionError)
