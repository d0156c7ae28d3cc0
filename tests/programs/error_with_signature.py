"""Raises in the root the error a DataLoader raises when a worker dies: the harness records it
in the result, not in stderr."""
raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed")
