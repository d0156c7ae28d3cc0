"""Deadlock: a thread holds a lock while the main thread forks; the child takes the lock."""
import os
import threading

lock = threading.Lock()
held = threading.Event()
never = threading.Event()


def holder():
    with lock:
        held.set()
        never.wait()  # untimed: keeps the lock forever


threading.Thread(target=holder, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    lock.acquire()  # the copy of the lock is held by a thread that does not exist here
    os._exit(0)
os.waitpid(pid, 0)
