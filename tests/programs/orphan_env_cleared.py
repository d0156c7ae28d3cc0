"""Exits 0 leaving a sleeper that carries no run token (its environment is empty) and is no
longer the root's descendant once the root is gone. argv: PIDFILE [popen|shell]: the sleeper
is the root's own child (Popen with env={}) or started by a shell through ``env -i ... &``
(an orphan from the start). Writes the sleeper's pid to PIDFILE."""
import shlex
import subprocess
import sys

SLEEPER = "import time; time.sleep(1000)"
pidfile, how = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "popen"
if how == "popen":
    pid = subprocess.Popen([sys.executable, "-c", SLEEPER], env={}, stdin=subprocess.DEVNULL).pid
else:
    line = f"env -i {shlex.quote(sys.executable)} -c {shlex.quote(SLEEPER)} </dev/null >/dev/null 2>&1 & echo $!"
    pid = int(subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout)
with open(pidfile, "w") as fh:
    fh.write(str(pid))
print("leaving", flush=True)
