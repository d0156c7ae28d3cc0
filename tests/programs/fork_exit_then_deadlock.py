"""A forked child (os.fork, no exec) leaves through sys.exit(0), back into the harness's
child.main; the parent reaps it, then deadlocks on a plain lock taken twice. The verdict is
HANG with the code still running: the forked child's exit must not write the result."""
import os
import sys
import threading

pid = os.fork()
if pid == 0:
    sys.exit(0)
os.waitpid(pid, 0)
lock = threading.Lock()
lock.acquire()
lock.acquire()  # untimed: never released
