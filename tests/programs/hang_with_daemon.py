"""HANG across a tree: a child, a setsid double-forked daemon, all in untimed waits."""
import os
import signal
import subprocess
import sys

child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.write(w, b"up")
        os.close(w)
        signal.pause()
        os._exit(0)
    os._exit(0)
os.close(w)
os.waitpid(pid, 0)
os.read(r, 2)
child.wait()  # untimed: the child pauses forever
