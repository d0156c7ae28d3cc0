"""Repository-wide pytest setup: never reach a model hub, in this process or its children."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
