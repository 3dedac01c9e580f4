"""Bad input to ``hadakit bench``, ``hadakit train-demo`` and recipe strings: one named error line, exit 2, no
traceback, nothing written, and no work started (every check here runs before any benchmark, training or model)."""

import pytest
import torch

from hadakit.cli.main import main
from hadakit.quantization.recipes import get_recipe

FAST_BENCH = ["--mib", "0.01", "--reps", "1", "--ops", "hadamard", "--sizes", "64"]
TINY_DEMO = ["--recipes", "bf16", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--context", "16",
             "--batch", "2", "--steps", "2", "--eval-every", "2"]


def _bad(argv, capsys, out, *words):
    """Run ``hadakit ARGV``; expect exit 2, exactly one error line naming ``words``, no traceback, no output file
    and nothing printed on stdout (no work began)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap.out, cap.err)
    assert "Traceback" not in cap.err
    errors = [line for line in cap.err.splitlines() if "error:" in line]
    assert len(errors) == 1, cap.err
    assert errors[0].startswith(f"hadakit {argv[0]}: error:"), cap.err
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert cap.out == "", cap.out
    assert not out.exists()
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------
# hadakit bench
# ---------------------------------------------------------------------------------------------------------------


def _bench(tmp_path, *extra):
    out = tmp_path / "bench"
    return ["bench", *FAST_BENCH, *extra, "--out", str(out)], out


def test_bench_unknown_device(tmp_path, capsys):
    argv, out = _bench(tmp_path, "--device", "banana")
    _bad(argv, capsys, out, "banana", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_cuda_without_gpu(tmp_path, capsys):
    argv, out = _bench(tmp_path, "--device", "cuda")
    _bad(argv, capsys, out, "cuda", "--device cpu")


def test_bench_unknown_dtype(tmp_path, capsys):
    argv, out = _bench(tmp_path, "--dtypes", "int8")
    _bad(argv, capsys, out, "--dtypes", "int8", "fp32, bf16, fp16")


def test_bench_unknown_op(tmp_path, capsys):
    argv, out = _bench(tmp_path, "--ops", "banana")
    _bad(argv, capsys, out, "--ops", "banana", "hadamard, randomized, block32, backward")


@pytest.mark.parametrize("size", ["0", "-64"])
def test_bench_non_positive_size(tmp_path, capsys, size):
    argv, out = _bench(tmp_path, "--sizes", size)
    _bad(argv, capsys, out, "--sizes", size, "positive")


def test_bench_size_without_hadamard_matrix(tmp_path, capsys):
    argv, out = _bench(tmp_path, "--sizes", "64,16256")
    _bad(argv, capsys, out, "--sizes", "16256", "16248", "16268")


def test_bench_empty_size_list(tmp_path, capsys):
    argv, out = _bench(tmp_path, "--sizes", ",")
    _bad(argv, capsys, out, "--sizes")


@pytest.mark.parametrize("flag,value", [("--mib", "0"), ("--mib", "-1"), ("--mib", "nan"), ("--reps", "0"),
                                        ("--reps", "-3")])
def test_bench_non_positive_mib_and_reps(tmp_path, capsys, flag, value):
    argv, out = _bench(tmp_path, flag, value)  # given after FAST_BENCH's value: the last one counts
    _bad(argv, capsys, out, flag, value)


def test_bench_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder\n")
    rc = main(["bench", *FAST_BENCH, "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 2 and "--out" in cap.err and cap.out == "" and "Traceback" not in cap.err
    assert out.read_text() == "not a folder\n"


# ---------------------------------------------------------------------------------------------------------------
# hadakit train-demo
# ---------------------------------------------------------------------------------------------------------------


def _demo(tmp_path, *extra):
    out = tmp_path / "demo"
    return ["train-demo", *TINY_DEMO, *extra, "--out", str(out)], out


def test_demo_heads_must_divide_width(tmp_path, capsys):
    argv, out = _demo(tmp_path, "--n-head", "7", "--d-model", "64")
    _bad(argv, capsys, out, "--d-model 64", "--n-head 7")


def test_demo_unknown_device(tmp_path, capsys):
    argv, out = _demo(tmp_path, "--device", "banana")
    _bad(argv, capsys, out, "banana")


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--steps", "-5"), ("--n-layer", "0"), ("--d-model", "0"),
                                        ("--n-head", "0"), ("--context", "0"), ("--batch", "0"),
                                        ("--eval-every", "0"), ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "nan"),
                                        ("--threads", "0")])
def test_demo_non_positive_settings(tmp_path, capsys, flag, value):
    argv, out = _demo(tmp_path, flag, value)
    _bad(argv, capsys, out, flag, value)


# ---------------------------------------------------------------------------------------------------------------
# Recipe strings
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,words", [
    ("w4a16_g128:hadamard:gptq:refit=-1", ["refit", "-1"]),
    ("w4a16_g128:hadamard:gptq:refit=0", ["refit", "0"]),
    ("w4a16_g128:hadamard:gptq:refit=abc", ["refit", "abc"]),
    ("w4a16_g128:hadamard:gptq:wclip=0", ["wclip", "no value"]),
    ("w4a16_g128:hadamard:gptq:seq=1", ["seq", "no value"]),
    ("w4a16_g128:hadamard:gptq:actorder=false", ["actorder", "no value"]),
    ("w4a4:random:rtn:fusevo=1", ["fusevo", "no value"]),
    ("kv4:none:rtn:kvcenter=0", ["kvcenter", "no value"]),
    ("kv4:none:rtn:kvclip=yes", ["kvclip", "no value"]),
    ("w4a4:random:rtn:learn=affine,steps=abc", ["steps", "abc"]),
    ("w4a4:random:rtn:learn=affine,steps=0", ["steps", "0"]),
    ("w4a4:random:rtn:steps=5", ["steps", "learn"]),
    ("w4a4kv4:random:rtn:sinks=-1", ["sinks", "-1"]),
    ("w4a4kv4:random:rtn:sinks=two", ["sinks", "two"]),
    ("w4a4kv4:random:rtn:kvgroup=abc", ["kvgroup", "abc"]),
    ("w4a4kv4:random:rtn:kvgroup=0", ["kvgroup", "0"]),
    ("w4a16_g128:hadamard:gptq:fptarget=abc", ["fptarget", "abc"]),
    ("w4a16_g128:hadamard:gptq:fptarget=0", ["fptarget", "0"]),
    ("w4a16_g128:hadamard:rtn:store", ["store", "bf16"]),
    ("w4a16:hadamard:rtn:refit=3", ["refit", "gptq", "rtn"]),
    ("w4a16:hadamard:rtn:actorder", ["actorder", "gptq", "rtn"]),
    ("w4a16:hadamard:rtn:seq", ["seq", "gptq", "rtn"]),
    ("w4a16:hadamard:rtn:fptarget", ["fptarget", "gptq", "rtn"]),
    ("w4a16:block-abc", ["block-abc", "block size"]),
    ("w4a16:block-", ["block-", "block size"]),
    ("w4a16:block-0", ["block-0", "positive"]),
    ("w4a16:block--8", ["block--8", "positive"]),
    ("w4a16:block-7", ["block-7", "Hadamard", "4, 8"]),
    ("w4a16:block-16256", ["block-16256", "16248, 16268"]),
])
def test_bad_recipe_options(spec, words):
    with pytest.raises(ValueError) as info:
        get_recipe(spec)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_valid_recipe_options_keep_their_meaning():
    r = get_recipe("w4a16_g128:block-128:gptq:refit=2,actorder,seq,wclip,store=bf16")
    assert (r.rotation.kind, r.rotation.block_size, r.gptq.refit, r.gptq.act_order, r.sequential, r.weight_clip,
            r.store_dtype) == ("block", 128, 2, True, True, True, "bf16")
    assert get_recipe("w4a16_g128:hadamard:gptq:refit").gptq.refit == 1
    assert get_recipe("w4a16_g128:hadamard:gptq:fptarget").fp_target == 0.5
    r = get_recipe("w4a4kv4:random:rtn:smooth=search,learn=orthogonal,steps=5,sinks=0,kvgroup=64,kvclip,kvcenter")
    assert (r.learn_steps, r.kv_sink_tokens, r.kv_center, r.learned) == (5, 0, True, "orthogonal")
    # seq on RTN does something when options are fitted per linear (their inputs then come from the quantized ones)
    assert get_recipe("w4a4:random:rtn:smooth=search,seq").sequential


class _Tiny(torch.nn.Module):
    def __init__(self, widths=(64, 128)):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(w, 64) for w in widths)
        self.lm_head = torch.nn.Linear(48, 10)  # skipped by default: its width is never checked


def test_check_recipe_for_model_block_size():
    from hadakit.quantization.recipes import check_recipe_for_model

    model = _Tiny()
    check_recipe_for_model(get_recipe("w4a16:block-64"), model)
    check_recipe_for_model(get_recipe("w4a16:hadamard"), model)
    check_recipe_for_model(get_recipe("kv4"), model)
    with pytest.raises(ValueError) as info:
        check_recipe_for_model(get_recipe("w4a16:block-128"), model)
    msg = str(info.value)
    assert "\n" not in msg and "128" in msg and "layers.0" in msg and "64" in msg, msg
    # a layer the recipe skips is not checked
    check_recipe_for_model(get_recipe("w4a16:block-128", ignore=("lm_head", "layers.0")), model)
    # nor anything when no linear is replaced
    check_recipe_for_model(get_recipe("fp"), model)


def test_check_recipe_for_model_sizes_without_fallback():
    from hadakit.quantization.recipes import check_recipe_for_model

    strict = get_recipe("w4a16:hadamard")
    strict = get_recipe(strict, rotation=type(strict.rotation)(kind="hadamard", fallback=None))
    with pytest.raises(ValueError, match="layers.0.*16256"):
        check_recipe_for_model(strict, _Tiny(widths=(16256,)))
    check_recipe_for_model(get_recipe("w4a16:hadamard"), _Tiny(widths=(16256,)))  # the DCT fallback covers it
