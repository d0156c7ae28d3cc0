"""Exits with code 4 without letting the harness write a final result."""
import os
import sys

print("leaving early", file=sys.stderr, flush=True)
os._exit(4)
