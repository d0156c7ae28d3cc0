"""Loaded by every Python process of a scenario's tree (the harness puts this folder on
PYTHONPATH): fatal-signal tracebacks and an on-demand all-threads dump on SIGUSR1, both
into a per-process file under $SPLITREPRO_EVIDENCE_DIR. Forked children inherit the
handlers but reopen their own file at the next dump request through the pid check.
"""

import os

_dir = os.environ.get("SPLITREPRO_EVIDENCE_DIR")
if _dir:
    try:
        import faulthandler
        import signal

        _fh = open(os.path.join(_dir, f"faulthandler-{os.getpid()}.txt"), "w")  # noqa: SIM115
        faulthandler.enable(file=_fh, all_threads=True)
        faulthandler.register(signal.SIGUSR1, file=_fh, all_threads=True, chain=False)

        def _reopen_after_fork() -> None:
            global _fh
            try:
                _fh = open(os.path.join(_dir, f"faulthandler-{os.getpid()}.txt"), "w")  # noqa: SIM115
                faulthandler.enable(file=_fh, all_threads=True)
                faulthandler.register(signal.SIGUSR1, file=_fh, all_threads=True, chain=False)
            except Exception:
                pass

        os.register_at_fork(after_in_child=_reopen_after_fork)
    except Exception:  # never break the program under test
        pass
