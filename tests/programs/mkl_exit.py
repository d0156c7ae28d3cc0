"""Imitates mkl-service's deliberate C-level exit(1) on an incompatible threading layer."""
import os
import sys

sys.stderr.write("INTEL MKL ERROR: MKL_THREADING_LAYER=INTEL is incompatible with libgomp.so.1 library.\n")
sys.stderr.flush()
os._exit(1)
