"""True-sequential calibration reuses finished submodules' outputs: same result, fewer forwards, and a safe check."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hadakit.io.texts import calibration_windows
from hadakit.quantization import stage_reuse
from hadakit.quantization.pipeline import quantize_model
from hadakit.quantization.recipes import get_recipe


def _quantize(model, spec, calib, budget=None, monkeypatch=None):
    m = model
    if budget is not None:
        monkeypatch.setattr(stage_reuse, "REUSE_BUDGET_BYTES", budget)
    report = quantize_model(m, get_recipe(spec), calib=calib)
    if budget is not None:
        monkeypatch.undo()
    return m, report


@pytest.mark.model
@pytest.mark.parametrize("spec", ["w4a16_g128:hadamard:gptq:seq", "w4a4:random:gptq:fptarget"])
def test_reuse_gives_the_same_model_bit_for_bit_with_fewer_forwards(minilm, monkeypatch, spec):
    model, tok, enc = minilm
    n_win, n_layers = 3, 6
    calib = calibration_windows(tok, "lear", n_windows=n_win, window=32, add_bos=False)
    counts, outs = {}, {}
    for budget in (0, None):  # 0: nothing is kept, every pass recomputes everything (the reference)
        m = copy.deepcopy(model)
        # BERT's attention core (not a candidate itself: it sits inside the "attention" child) runs only when
        # its parent is not reused.
        cores = [mod for n, mod in m.named_modules() if n.endswith("attention.self")]
        calls = []
        hooks = [c.register_forward_hook(lambda *a: calls.append(1)) for c in cores]
        m, report = _quantize(m, spec, calib, budget, monkeypatch)
        for h in hooks:
            h.remove()
        assert report.reuse_off is None
        counts[budget] = len(calls)
        with torch.no_grad():
            outs[budget] = m(**enc).last_hidden_state
    assert torch.equal(outs[0], outs[None])
    # Per layer: one window of the forward that records the layers' keyword arguments (it stops at the last layer's
    # input, so the last layer is not run there), the grouping probe (1 window),
    # the full-precision pass (fptarget), then the stage passes for
    # query/key/value (stops before attention finishes), attention.output.dense, intermediate.dense and
    # output.dense, and the final pass (not in the last layer). Reused, attention finishes once (third pass) and
    # is recomputed only on the checked first window of the two passes after it.
    fp = n_win if "fptarget" in spec else 0
    assert counts[0] == n_layers * (2 + fp + 4 * n_win) - n_win - 1
    assert counts[None] == n_layers * (2 + fp + 2 * n_win + 2) - 2


class _Counter(nn.Module):
    """Output changes with every call: a hidden state the reuse reasoning does not cover."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (1 + 0.1 * self.calls)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.pre = _Counter(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, **kwargs):
        return x + self.down(torch.relu(self.up(self.pre(x))))


class _ToyLM(nn.Module):
    def __init__(self, d=128, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Block(d) for _ in range(2)])

    def forward(self, ids, use_cache=False):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_submodule_whose_output_changes_between_passes_turns_reuse_off(monkeypatch):
    torch.manual_seed(0)
    model = _ToyLM()
    calib = torch.randint(0, 50, (3, 16))
    spec = "w4a16_g128:none:gptq:seq"
    ref, rep0 = _quantize(copy.deepcopy(model), spec, calib, 0, monkeypatch)
    got, rep = _quantize(copy.deepcopy(model), spec, calib, None, monkeypatch)
    assert rep0.reuse_off is None
    assert rep.reuse_off is not None and "pre" in rep.reuse_off, rep.reuse_off
    assert "reuse turned off at layer 0: pre's output changed" in rep.summary()
    # Caught on the first window of the pass after it was kept: the result still matches recomputing everything.
    for n in ("layers.0.up", "layers.0.down", "layers.1.pre.lin", "layers.1.up", "layers.1.down"):
        assert torch.equal(ref.get_submodule(n).weight, got.get_submodule(n).weight), n


def test_outputs_are_kept_within_the_budget_and_parents_replace_their_children():
    torch.manual_seed(0)
    block = _Block(8)
    block.pre = nn.Sequential(nn.Linear(8, 8))  # a child holding a linear: candidate, and so is its linear
    reuse = stage_reuse.StageReuse(block, lambda m: isinstance(m, nn.Linear))
    assert reuse.names == ["pre", "up", "down", "pre.0"]
    xs = [torch.randn(4, 8) for _ in range(2)]

    class Stop(Exception):
        pass

    def pass_stopping_at_down(r):
        def hook(m, a):
            raise Stop
        h = block.down.register_forward_pre_hook(hook)
        with r.run(len(xs)):
            for j, x in enumerate(xs):
                r.window = j
                with pytest.raises(Stop):
                    block(x)
        h.remove()

    with torch.no_grad():
        pass_stopping_at_down(reuse)  # pre (with pre.0) and up finished
        assert sorted(reuse.kept) == ["pre", "up"]  # pre.0 is inside pre: not kept
        # pre and pre.0 (8 floats per row, 4 rows, 2 windows each) fit, up (16 per row) does not
        small = stage_reuse.StageReuse(block, lambda m: isinstance(m, nn.Linear), budget=2 * 2 * 4 * 8 * 4)
        pass_stopping_at_down(small)
        assert sorted(small.kept) == ["pre"]  # pre.0 dropped for its parent
        want = [block(x) for x in xs]
        with reuse.run(len(xs), keep=False):
            got = []
            for j, x in enumerate(xs):
                reuse.window = j
                got.append(block(x))
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        assert "forward" not in block.pre.__dict__  # the patches are gone after the pass


def _tiny(arch):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D linears, q/k/v fused in one
        config = tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(config).eval()
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    config = cls[0](vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return cls[1](config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_reuse_is_exact_on_other_decoder_families(arch, monkeypatch):
    model = _tiny(arch)
    calib = torch.randint(0, 96, (3, 24))
    ids = torch.randint(0, 96, (1, 24))
    spec = "w4a16:none:gptq:fptarget"
    ref, rep0 = _quantize(copy.deepcopy(model), spec, calib, 0, monkeypatch)
    kept = set()
    real_exit = stage_reuse._Pass.__exit__

    def spy(self, *exc):
        out = real_exit(self, *exc)
        kept.update(self.reuse.kept)
        return out

    monkeypatch.setattr(stage_reuse._Pass, "__exit__", spy)
    got, rep = _quantize(copy.deepcopy(model), spec, calib, None, monkeypatch)
    assert rep.reuse_off is None, rep.reuse_off
    assert {"attn", "self_attn"} & kept, kept  # the attention block was reused
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
