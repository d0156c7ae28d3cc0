"""Deadlock: parent and child each wait to read from the other before writing."""
import subprocess
import sys

child = subprocess.Popen(
    [sys.executable, "-c", "import sys; sys.stdin.buffer.read(1); sys.stdout.buffer.write(b'x')"],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
)
child.stdout.read(1)  # the child waits for us first: nobody ever writes
child.stdin.write(b"y")
