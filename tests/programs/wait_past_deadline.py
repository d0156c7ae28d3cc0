"""Blocked in a wait whose timeout ends long after the run's deadline: a HANG within the run."""
import threading

threading.Event().wait(10_000)
