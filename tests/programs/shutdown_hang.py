"""The code finishes, then interpreter shutdown waits forever for a non-daemon thread."""
import threading

threading.Thread(target=threading.Event().wait, name="forever").start()
print("main code done", flush=True)
