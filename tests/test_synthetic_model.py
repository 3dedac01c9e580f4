"""Seeded synthetic checkpoints (hadakit.io.synthetic): loadable by transformers, bit-reproducible per tensor,
sharded consistently, written in bounded memory and never over a user's directory."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hadakit.io.synthetic import (
    SYNTHETIC_MARKER,
    SyntheticDims,
    choose_dims,
    parameter_count,
    parse_size,
    synthetic_tensor,
    synthetic_tensor_specs,
    write_synthetic_model,
)
from hadakit.outdir import OutputDirError
from hadakit.transforms import supported

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

# ~17 MB (llama, untied) / ~9 MB (qwen2, tied) in bfloat16
SMALL = SyntheticDims(hidden=128, intermediate=384, layers=2, heads=2, kv_heads=1, vocab=32000)


def _read_all(d):
    """Every tensor in every shard of directory d, as {name: tensor}, plus {name: file}."""
    from safetensors import safe_open

    tensors, where = {}, {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="pt") as h:
                for k in h.keys():
                    assert k not in tensors, f"{k} stored twice"
                    tensors[k], where[k] = h.get_tensor(k), f
    return tensors, where


def _bits(t):
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A llama (untied, MiniLM tokenizer) and a qwen2 (tied, byte-level tokenizer) model with 4 MB shards."""
    root = tmp_path_factory.mktemp("synthetic")
    return {arch: write_synthetic_model(root / arch, arch=arch, size=SMALL, seed=0, shard_size="4MB", tokenizer=True)
            for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loads_in_transformers_and_runs(written, arch, single_thread):
    info = written[arch]
    model, loading = transformers.AutoModelForCausalLM.from_pretrained(info.path, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    assert not loading["error_msgs"]
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert model.dtype == torch.bfloat16  # the config's dtype
    # what was loaded is what was written, not transformers' own init: every tensor regenerates alone, bit for bit
    state = model.state_dict()
    for name, t in state.items():
        if name == "lm_head.weight" and info.tie_embeddings:
            continue
        assert torch.equal(_bits(t), _bits(synthetic_tensor(name, t.shape, seed=0))), name
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == info.tie_embeddings == (arch == "qwen2")
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in state
    tok = transformers.AutoTokenizer.from_pretrained(info.path)
    text = "Hadamard rotations spread outliers evenly."
    ids = tok(text, return_tensors="pt").input_ids
    assert int(ids.max()) < info.dims.vocab and ids.shape[1] >= 5
    if arch == "llama":
        assert ids[0, 0].item() == tok.cls_token_id == model.config.bos_token_id  # [CLS] as BOS
    else:
        assert tok.decode(ids[0]) == text  # byte-level: exact round trip
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], info.dims.vocab)
    assert torch.isfinite(logits).all() and logits.float().std() > 0


def test_values_look_like_an_init(written):
    tensors, _ = _read_all(written["llama"].path)
    w = tensors["model.layers.0.mlp.down_proj.weight"].double()
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    norm = tensors["model.layers.1.input_layernorm.weight"].double()
    assert abs(norm.mean().item() - 1.0) < 0.01 and 0 < norm.std().item() < 0.05  # about one, not exactly one


def test_index_maps_every_tensor_to_its_shard(written):
    for info in written.values():
        d = info.path
        index = json.loads((d / "model.safetensors.index.json").read_text())
        tensors, where = _read_all(d)
        assert index["weight_map"] == where  # every tensor, in the shard the index names, nothing unindexed
        assert all((d / f).is_file() for f in set(index["weight_map"].values()))
        assert len(set(where.values())) == info.shard_count > 1
        expected = dict(synthetic_tensor_specs(info.arch, SMALL, tie_embeddings=info.tie_embeddings))
        assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
        assert ("lm_head.weight" in tensors) == (not info.tie_embeddings)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_bytes_on_disk_match_the_parameter_count(written):
    for info in written.values():
        params = parameter_count(info.arch, info.dims, info.tie_embeddings)  # analytic
        meta = sum(math.prod(s) for _, s in synthetic_tensor_specs(info.arch, info.dims,
                                                                   tie_embeddings=info.tie_embeddings))
        assert info.parameter_count == params == meta
        shard_bytes = sum(f.stat().st_size for f in info.path.glob("*.safetensors"))
        assert params * 2 <= shard_bytes <= params * 2 + 4096 * info.shard_count  # data + small headers
        assert info.bytes_written == sum(f.stat().st_size for f in info.path.rglob("*") if f.is_file())


def test_config_readme_and_marker_say_random(written):
    for info in written.values():
        cfg = json.loads((info.path / "config.json").read_text())
        assert "accuracy" in cfg["hadakit_synthetic"]["note"] and cfg["hadakit_synthetic"]["seed"] == 0
        assert "random" in (info.path / "README.md").read_text().lower()
        marker = json.loads((info.path / SYNTHETIC_MARKER).read_text())
        assert marker["format"] == "hadakit-synthetic-model" and marker["dims"]["hidden"] == 128


def test_same_seed_same_bits_whatever_the_shard_size(tmp_path, written):
    one = write_synthetic_model(tmp_path / "one", arch="llama", size=SMALL, seed=0, shard_size="1GB")
    other_seed = write_synthetic_model(tmp_path / "seed1", arch="llama", size=SMALL, seed=1, shard_size="4MB")
    assert one.shard_count == 1 and written["llama"].shard_count > 1
    a, _ = _read_all(one.path)
    b, _ = _read_all(written["llama"].path)
    c, _ = _read_all(other_seed.path)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(_bits(a[k]), _bits(b[k])), k
        assert not torch.equal(_bits(a[k]), _bits(c[k])), f"{k}: seed 1 gave the same values as seed 0"
    # and independently of the other tensors: two tensors of one shape differ
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.gate_proj.weight"])


def test_big_tensor_is_generated_in_blocks_that_do_not_depend_on_the_shard(tmp_path):
    # 2^22-element blocks: an embedding of 40000 x 128 = 5.1M elements spans two blocks
    dims = SyntheticDims(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=1, vocab=40000)
    info = write_synthetic_model(tmp_path / "m", size=dims, dtype="float32", shard_size="1MB")
    t, _ = _read_all(info.path)
    e = t["model.embed_tokens.weight"]
    assert e.dtype == torch.float32 and torch.equal(e, synthetic_tensor("model.embed_tokens.weight", e.shape,
                                                                        dtype="float32"))
    assert not torch.equal(e[:1000], e[32768:33768])  # the second block is not a repeat of the first


def test_writing_a_model_many_shards_big_keeps_memory_bounded(tmp_path):
    """Peak RSS of a child writing a ~200 MB model in 20 MB shards grows < 150 MB over its own baseline (imports and
    a meta model built). The child's own VmHWM: the pytest process's RUSAGE_CHILDREN is the maximum over every child
    any test ever ran, and a child's ru_maxrss starts at its launching process's peak (it survives exec). Control: the same measurement sees a 512 MB allocation."""
    script = textwrap.dedent(f"""
        import json, torch
        from hadakit.io.synthetic import synthetic_tensor_specs, write_synthetic_model
        rss = lambda: [int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
        synthetic_tensor_specs("llama", "200MB")
        base = rss()
        info = write_synthetic_model({str(tmp_path / "big")!r}, arch="llama", size="200MB", shard_size="20MB")
        peak = rss()
        x = torch.ones(128 * 2**20)  # the control: 512 MB touched
        control = rss()
        print(json.dumps(dict(base=base, peak=peak, control=control, bytes=info.tensor_bytes,
                              shards=info.shard_count)))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["bytes"] >= 200e6 and r["shards"] >= 8
    assert r["peak"] - r["base"] < 150e6, r
    assert r["control"] - r["peak"] > 300e6, r  # the measurement sees an allocation the size of the model


def test_refuses_an_unrelated_directory_and_leaves_it_untouched(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my own work")
    for force, err in ((False, FileExistsError), (True, OutputDirError)):
        with pytest.raises(err, match="mine"):
            write_synthetic_model(target, size=SMALL, force=force)
        assert sorted(os.listdir(target)) == ["notes.txt"] and (target / "notes.txt").read_text() == "my own work"
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temporary left behind


def test_replaces_a_previous_synthetic_model_only_with_force(tmp_path):
    target = tmp_path / "m"
    write_synthetic_model(target, size=SMALL, seed=0)
    with pytest.raises(FileExistsError, match="force"):
        write_synthetic_model(target, size=SMALL, seed=1)
    assert json.loads((target / SYNTHETIC_MARKER).read_text())["seed"] == 0
    write_synthetic_model(target, size=SMALL, seed=1, force=True)
    assert json.loads((target / SYNTHETIC_MARKER).read_text())["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_an_interrupted_write_leaves_nothing(tmp_path):
    class Stop(Exception):
        pass

    def progress(ev):
        if ev.tensors_done == 3:
            raise Stop

    with pytest.raises(Stop):
        write_synthetic_model(tmp_path / "m", size=SMALL, shard_size="1MB", progress=progress)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("size", ["20MB", "300MB", "2GB", "12GB", "70GB"])
def test_dims_from_a_target_size(arch, size):
    target = parse_size(size)
    tie = arch == "qwen2"
    d = choose_dims(arch, size)
    assert d.hidden % 128 == 0 and supported(d.hidden) and supported(d.intermediate)
    assert d.head_dim in (64, 128) and d.heads % d.kv_heads == 0
    assert d.kv_heads < d.heads or d.heads < 4  # grouped-query attention
    assert 2.5 <= d.intermediate / d.hidden <= 3.5
    got = parameter_count(arch, d, tie) * 2
    fewer = SyntheticDims(d.hidden, d.intermediate, d.layers - 1, d.heads, d.kv_heads, d.vocab)
    assert got >= target and (d.layers == 1 or parameter_count(arch, fewer, tie) * 2 < target)  # smallest depth
    assert got < 1.15 * target


def test_dims_count_matches_the_transformers_model():
    d = choose_dims("llama", "12GB")
    assert (d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads) == (4096, 11008, 33, 32, 8)
    specs = synthetic_tensor_specs("llama", "12GB")
    assert sum(math.prod(s) for _, s in specs) == parameter_count("llama", d, False)
    assert len(specs) == 2 + 9 * 33 + 1


def test_parse_size():
    assert parse_size("300MB") == 300 * 10**6 and parse_size("1.5GiB") == 3 * 2**29 and parse_size(7) == 7
    assert parse_size("12gb") == 12 * 10**9
    for bad in ("12 parsecs", "", "-1GB", "GB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    with pytest.raises(TypeError, match="size"):
        parse_size(1.5)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(arch="gpt2"), ValueError, "arch"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(shard_size=0), ValueError, "shard_size"),
    (dict(size="1MB"), ValueError, "smallest"),
    (dict(size=dict(hidden=128, intermediate=384, layers=1, heads=3, kv_heads=1)), ValueError, "heads"),
    (dict(size=dict(hidden=128, intermediate=384, layers=1, heads=4, kv_heads=3)), ValueError, "kv_heads"),
    (dict(size=dict(hidden=128, layers=1)), TypeError, "intermediate"),
    (dict(size=SyntheticDims(128, 384, 1, 2, 1, vocab=1000), tokenizer=True), ValueError, "vocab"),
    (dict(size=3.5), TypeError, "size"),
])
def test_bad_input_is_refused_before_writing(tmp_path, kwargs, err, match):
    with pytest.raises(err, match=match):
        write_synthetic_model(tmp_path / "m", **kwargs)
    assert os.listdir(tmp_path) == []


def test_gemma3_shape(tmp_path):
    """The Gemma-3-shaped synthetic model: Gemma3ForCausalLM with q/k norms and four norms a layer, tied
    embeddings, sliding layers with a global one every sixth (the last one below six layers), parameter count exact."""
    from hadakit.io.synthetic import gemma3_layer_types

    assert gemma3_layer_types(2) == ["sliding_attention", "full_attention"]
    assert [i for i, k in enumerate(gemma3_layer_types(18)) if k == "full_attention"] == [5, 11, 17]
    dims = SyntheticDims(hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1, vocab=1000)
    info = write_synthetic_model(tmp_path / "g", arch="gemma3", size=dims, shard_size="1MB", sliding_window=4)
    cfg = json.loads((info.path / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["sliding_window"] == 4 and info.tie_embeddings
    names = json.loads((info.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.q_norm.weight" in names and "model.layers.0.pre_feedforward_layernorm.weight" \
        in names and "lm_head.weight" not in names
    assert info.parameter_count == parameter_count("gemma3", dims, True)
    with pytest.raises(ValueError, match="only with arch='gemma3'"):
        write_synthetic_model(tmp_path / "l", arch="llama", size=dims, sliding_window=4)
    with pytest.raises(ValueError, match="tokenizer=True is not available for gemma3"):
        write_synthetic_model(tmp_path / "t", arch="gemma3", size=dims, tokenizer=True)
