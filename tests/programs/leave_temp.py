"""Exits 0 leaving a temp dir with a bound Unix socket in it, and a child that sleeps holding
it. Writes the dir's path to the file named by argv[1]."""
import os
import socket
import subprocess
import sys
import tempfile

d = tempfile.mkdtemp(prefix="left-behind-")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(os.path.join(d, "server.sock"))
sock.listen()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"], pass_fds=[sock.fileno()])
with open(sys.argv[1], "w") as fh:
    fh.write(d)
