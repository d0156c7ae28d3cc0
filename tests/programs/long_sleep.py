"""Sleeps far past any deadline: a sleep is passage of time, never a HANG."""
import time

time.sleep(1000)
