"""HANG: the root forks (os.fork, so at-fork handlers run in the child) and the child execs a
program that is not Python (``cat``, reading a pipe nobody writes); the root waits for it. The
exec'd program has no SIGUSR1 handler: asking it for a faulthandler dump would kill it, and the
root would run on. After waitpid returns, the root writes how its child ended to ARGV[1]."""
import os
import sys

status_file = sys.argv[1]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.dup2(r, 0)
    os.execvp("cat", ["cat"])
os.close(r)
_, status = os.waitpid(pid, 0)  # untimed; `cat` reads forever since w stays open here
with open(status_file, "w") as fh:
    fh.write(str(status))
