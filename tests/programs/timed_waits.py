"""Waits with timeouts and sleeps, each longer than the hang window, then succeeds."""
import os
import select
import threading
import time

T = 1.15
lock = threading.Lock()
lock.acquire()
assert not lock.acquire(timeout=T)  # timed futex wait, nobody releases
assert not threading.Event().wait(T)  # timed condition wait
r, w = os.pipe()
assert select.select([r], [], [], T) == ([], [], [])  # select with a timeout
t = threading.Thread(target=time.sleep, args=(T,))
t.start()
t.join()  # untimed join, but the other thread sleeps: not a hang
time.sleep(T)
print("done")
