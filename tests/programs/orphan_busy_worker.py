"""PASS, not HANG: the root waits (an untimed read) on a pipe that a worker writes once it has
worked for 3 s. The worker carries no run token (``env -i``) and is an orphan from the start
(its shell exits at once): only its session ties it to the run. argv: sleep|busy."""
import shlex
import subprocess
import sys

WORK = {
    "sleep": "import time; time.sleep(3); print('done', flush=True)",
    "busy": "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass\nprint('done', flush=True)",
}[sys.argv[1]]
shell = subprocess.Popen(
    ["sh", "-c", f"env -i {shlex.quote(sys.executable)} -c {shlex.quote(WORK)} </dev/null 2>/dev/null &"],
    stdout=subprocess.PIPE,
)
shell.wait()  # the shell is gone: the worker is reparented away from the root
line = shell.stdout.readline()  # untimed read until the worker writes
assert line == b"done\n", line
