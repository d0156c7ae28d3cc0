"""Reads the file named by argv[1] and writes argv[2], both relative to the current directory,
as a user's script run with `python relative_paths.py in.txt out.txt` would."""
import sys

with open(sys.argv[1]) as fh:
    text = fh.read()
assert text == "input\n", text
with open(sys.argv[2], "w") as fh:
    fh.write(text.upper())
