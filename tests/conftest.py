"""Test-session setup.

Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET when a
kernel is defined, so it is set here, before any test module imports hadakit's kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets one intra-op thread: two workers x two threads on two cores oversubscribes
# the machine, and small tensor ops then run up to 100x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Model tests load real models from PyPI data packages; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
