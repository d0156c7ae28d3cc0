import sys

print("args", sys.argv[1:])
assert sys.argv[1:] == ["a", "b"], sys.argv
