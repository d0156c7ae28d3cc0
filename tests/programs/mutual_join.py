"""Deadlock: two threads join each other; the main thread joins the first."""
import threading

threads = {}
ready = threading.Barrier(3)


def run(other):
    ready.wait()
    threads[other].join()


threads["a"] = threading.Thread(target=run, args=("b",))
threads["b"] = threading.Thread(target=run, args=("a",))
threads["a"].start()
threads["b"].start()
ready.wait()
threads["a"].join()
