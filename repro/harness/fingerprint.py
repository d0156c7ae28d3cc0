"""The fingerprint of a build: what expectations are written against.

:func:`collect` runs only in a child interpreter (it imports torch, then numpy, then asks
threadpoolctl which native thread pools are loaded). The harness parent calls
:func:`get_fingerprint`, which runs ``python -m repro env --json`` in a clean child once per
interpreter and caches the answer in memory and under ``.repro-cache/`` keyed by the
interpreter and the mtime of its torch install.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

_MEMO: dict[str, dict[str, Any]] = {}
PROBE_TIMEOUT_S = 60.0  # finding torch (no import)
COLLECT_TIMEOUT_S = 300.0  # importing torch and numpy, asking threadpoolctl


class FingerprintError(RuntimeError):
    """The interpreter gave no fingerprint: it failed (no torch?), hung, or printed something
    else than the fingerprint's JSON on stdout. The message is one line."""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def parse_parallel_info(text: str) -> dict[str, Any]:
    """Fields of ``torch.__config__.parallel_info()``."""
    out: dict[str, Any] = {}
    m = re.search(r"ATen parallel backend:\s*(.+)", text)
    if m:
        out["backend"] = m.group(1).strip()
    m = re.search(r"at::get_num_threads\(\)\s*:\s*(\d+)", text)
    if m:
        out["num_threads"] = int(m.group(1))
    m = re.search(r"at::get_num_interop_threads\(\)\s*:\s*(\d+)", text)
    if m:
        out["interop_threads"] = int(m.group(1))
    m = re.search(r"MKL_THREADING_LAYER\S*\s*:\s*(\S+)", text)
    if m:
        out["mkl_threading_layer"] = m.group(1)
    return out


def collect() -> dict[str, Any]:
    """Fingerprint of the running interpreter. Imports torch: call it in a child only."""
    import torch  # noqa: F401  (import order matters: torch first, as user code does)

    try:
        import numpy  # noqa: F401
    except ImportError:
        pass
    fp: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": _version("torch") or getattr(torch, "__version__", None),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "build": os.environ.get("SPLITREPRO_BUILD") or ("mkl" if _version("mkl") else "bundled"),
        "mkl_pip": bool(_version("mkl")),
        "warnings": [],
    }
    info = torch.__config__.parallel_info()
    parsed = parse_parallel_info(info)
    fp["parallel_info"] = info
    fp["torch_parallel_backend"] = parsed.get("backend")
    fp["torch_num_threads"] = torch.get_num_threads()
    fp["torch_interop_threads"] = torch.get_num_interop_threads()
    fp["mkl_threading_layer"] = os.environ.get("MKL_THREADING_LAYER") or parsed.get("mkl_threading_layer")
    try:
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
    except Exception as exc:  # noqa: BLE001
        pools = []
        fp["warnings"].append(f"threadpoolctl failed: {exc!r}")
    fp["threadpools"] = [
        {
            k: p.get(k)
            for k in ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer", "filepath")
        }
        for p in pools
    ]
    omp = sorted({p["prefix"] for p in pools if p.get("internal_api") == "openmp"})
    fp["openmp_runtimes"] = omp
    if len(omp) > 1:
        fp["warnings"].append(f"two OpenMP runtimes loaded at once: {', '.join(omp)} (see OMP: Error #15 / claim 001)")
    for p in pools:
        if p.get("internal_api") == "mkl" and p.get("threading_layer"):
            fp["mkl_threading_layer"] = fp["mkl_threading_layer"] or p["threading_layer"]
    try:
        fp["cuda"] = bool(torch.cuda.is_available())
        fp["cuda_devices"] = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if fp["cuda"] else []
        )
    except Exception as exc:  # noqa: BLE001
        fp["cuda"], fp["cuda_devices"] = False, []
        fp["warnings"].append(f"CUDA query failed: {exc!r}")
    return fp


# -- parent side ---------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("SPLITREPRO_CACHE_DIR")
    if root:
        return Path(root)
    return Path(__file__).resolve().parents[2] / ".repro-cache"


def _run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` with stdout and stderr captured, in a session of its own whose
    processes are all killed on a timeout or an interruption: an interpreter that is a wrapper
    script running python as its child (no exec) leaves no hung python behind."""
    with subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torch_origin(python: str) -> str:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        import importlib.util

        spec = importlib.util.find_spec("torch")  # locates, does not import
        return spec.origin if spec and spec.origin else ""
    code = "import importlib.util as u; s = u.find_spec('torch'); print(s.origin if s and s.origin else '')"
    try:
        out = _run([python, "-c", code], PROBE_TIMEOUT_S, text=True)
    except subprocess.TimeoutExpired:
        raise FingerprintError(f"could not fingerprint {python}: no answer in {PROBE_TIMEOUT_S:g}s") from None
    except OSError as exc:
        raise FingerprintError(f"could not fingerprint {python}: cannot run it ({exc.strerror or exc})") from None
    return out.stdout.strip()


def _mtime(path: str | Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def cache_key(python: str) -> str:
    """Changes when the interpreter, its torch, or any package beside torch changes: installing
    or removing one (pip's ``mkl`` into a bundled venv turns it into the mkl build) adds or
    removes a directory in site-packages, which moves that directory's mtime."""
    origin = _torch_origin(python)
    stamps: list[int] = []
    if origin:
        torch_dir = Path(origin).parent
        stamps = [_mtime(torch_dir), _mtime(torch_dir / "version.py"), _mtime(torch_dir.parent)]
    raw = f"{os.path.realpath(python)}|{python}|{origin}|{stamps}|{os.environ.get('SPLITREPRO_BUILD', '')}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def get_fingerprint(
    python: str = sys.executable, *, refresh: bool = False, timeout: float | None = None
) -> dict[str, Any]:
    """The fingerprint of ``python``'s build, from a clean child, cached. Raises
    :class:`FingerprintError` (one line) when the interpreter cannot give one."""
    timeout = COLLECT_TIMEOUT_S if timeout is None else timeout
    key = cache_key(python)
    if not refresh and key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / f"fingerprint-{key}.json"
    if not refresh and path.exists():
        try:
            fp = json.loads(path.read_text("utf-8"))
            _MEMO[key] = fp
            return fp
        except ValueError:
            pass
    from repro.harness.runner import PROJECT_ROOT, child_env

    try:
        proc = _run(
            [python, "-m", "repro", "env", "--json", "--here"],
            timeout,
            text=True,
            errors="replace",
            env=child_env(),
            cwd=PROJECT_ROOT,
        )
    except subprocess.TimeoutExpired:
        raise FingerprintError(
            f"could not fingerprint {python}: no answer in {timeout:g}s (does importing torch hang?)"
        ) from None
    except OSError as exc:
        raise FingerprintError(f"could not fingerprint {python}: cannot run it ({exc.strerror or exc})") from None
    if proc.returncode != 0:
        why = _last_line(proc.stderr) or "no message"
        raise FingerprintError(f"could not fingerprint {python}: it exited {proc.returncode}: {why}")
    try:
        fp = json.loads(proc.stdout)
    except ValueError:
        fp = None
    if not isinstance(fp, dict):
        start = proc.stdout.strip()[:80]
        raise FingerprintError(
            f"could not fingerprint {python}: its output is not the fingerprint's JSON "
            f"(something else printed on stdout? it begins {start!r})"
        )
    _MEMO[key] = fp
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fp, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass
    return fp
