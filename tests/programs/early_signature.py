"""A runtime's message, then more than 4 KB of other output on stderr, then the end the message
announces: argv[1] 'omp' aborts (OMP: Error #15), 'mkl' exits 1 from "native code" as
mkl-service does."""
import os
import sys

if sys.argv[1] == "omp":
    sys.stderr.write("OMP: Error #15: Initializing libiomp5.so, but found libgomp.so.1 already initialized.\n")
else:
    sys.stderr.write("INTEL MKL ERROR: MKL_THREADING_LAYER=INTEL is incompatible with libgomp.so.1 library.\n")
for i in range(200):
    sys.stderr.write(f"unrelated line {i} of a chatty library, long enough to push the message out\n")
sys.stderr.flush()
if sys.argv[1] == "omp":
    os.abort()
os._exit(1)
