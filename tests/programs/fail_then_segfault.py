"""Fails its check, then segfaults at interpreter shutdown (an atexit handler reads address 0)."""
import atexit
import ctypes

atexit.register(ctypes.string_at, 0)
assert False, "the check failed"  # noqa: B011  (the failing check itself)
