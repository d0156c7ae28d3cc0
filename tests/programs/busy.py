"""Busy forever: never quiescent, so TIMEOUT at the deadline, never HANG."""
n = 0
while True:
    n += 1
