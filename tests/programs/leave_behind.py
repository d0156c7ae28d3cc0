"""Exits 0 leaving a child, a grandchild and a setsid double-forked daemon running."""
import os
import subprocess
import sys

SLEEPER = "import time; time.sleep(1000)"
# a child that starts a grandchild, says so, and sleeps; the grandchild sleeps too
CHILD = (
    "import subprocess, sys, time\n"
    f"subprocess.Popen([sys.executable, '-c', {SLEEPER!r}])\n"
    "print('grandchild started', flush=True)\n"
    "time.sleep(1000)\n"
)
child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
child.stdout.readline()
# a daemon: fork, setsid, fork again, the middle process exits
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.write(w, b"up")
        os.close(w)
        os.execv(sys.executable, [sys.executable, "-c", SLEEPER])
    os._exit(0)
os.close(w)
os.waitpid(pid, 0)
os.read(r, 2)  # the daemon is up
print("leaving", flush=True)
