"""Bad input to the model commands and files (issue 25, items 1-8, 10, 11 and 13): hadakit never deletes what it did
not write, never runs code from a model or checkpoint directory, never returns a wrong model with exit 0, and
checks every argument before the long work starts.

CLI cases go through the entry point (``hadakit.cli.main.main``) and check the exit code, the one-line message and
that no user file changed. "Before the work" is shown by pairing the bad argument with a model path that does not
exist: if the bad argument were checked late, the error would be about the model instead.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import tiny_llama  # noqa: E402
from hadakit.cli.main import main  # noqa: E402
from hadakit.io.checkpoint import load_quantized_model, save_quantized_model  # noqa: E402
from hadakit.io.loading import load_model  # noqa: E402
from hadakit.quantization.pipeline import quantize_model  # noqa: E402
from hadakit.quantization.recipes import get_recipe  # noqa: E402

NO_MODEL = "/nonexistent/model-dir"


def _run(capsys, *argv):
    """Exit code and stderr of ``hadakit ARGV`` (argparse errors exit through SystemExit)."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(err: str, command: str = "quantize") -> str:
    """The one error line (progress lines may come before it; nothing after it, and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hadakit")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith(f"hadakit {command}: error: ") and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def user_files(tmp_path):
    folder = tmp_path / "work"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("three years of work")
    (folder / "sub" / "data.csv").write_text("1,2,3")
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_dir):
    model, tok = load_model(tiny_dir)
    recipe = get_recipe("w4a16_g128:hadamard:rtn")
    quantize_model(model, recipe)
    return save_quantized_model(model, tok, recipe, tmp_path_factory.mktemp("ckpt") / "ckpt")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- item 1: --out / --force never deletes what hadakit did not write ---------------------------------------------

def test_force_never_replaces_the_working_directory(capsys, user_files, monkeypatch):
    monkeypatch.chdir(user_files)
    before = _snapshot(user_files)
    for out in (".", str(user_files), "..", "sub/.."):
        rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16", "--out", out, "--force")
        assert rc == 2
        line = _one_line_error(err)
        assert "working directory" in line and "--force never replaces it" in line
    assert _snapshot(user_files) == before


def test_force_only_replaces_a_hadakit_checkpoint(capsys, user_files, tiny_ckpt, tmp_path):
    before = _snapshot(user_files)
    rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16", "--out", str(user_files), "--force")
    assert rc == 2
    assert "it is not a hadakit checkpoint (it has no hadakit.json" in _one_line_error(err)
    assert _snapshot(user_files) == before
    # a hadakit.json that is not a checkpoint's does not count either
    (user_files / "hadakit.json").write_text('{"hello": 1}')
    rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16", "--out", str(user_files), "--force")
    assert rc == 2 and "not a hadakit checkpoint" in err
    # without --force an existing directory is refused; a real checkpoint passes the check (then the model is missing)
    rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16", "--out", str(tiny_ckpt))
    assert rc == 2 and "already exists" in err
    copy = _copy(tiny_ckpt, tmp_path / "old-ckpt")
    rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16", "--out", str(copy), "--force")
    assert rc == 2 and "no model at" in err


def test_out_that_is_a_file_or_under_a_file_or_a_link_is_refused_before_loading(capsys, user_files):
    before = _snapshot(user_files)
    for out, expected in ((user_files / "thesis.tex", "is a file, not a directory"),
                          (user_files / "thesis.tex" / "ckpt", "is a file, not a directory")):
        rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16", "--out", str(out), "--force")
        assert rc == 2 and expected in _one_line_error(err)
    link = user_files.parent / "link"
    link.symlink_to(user_files)
    rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16", "--out", str(link), "--force")
    assert rc == 2 and "symbolic link" in _one_line_error(err)
    assert _snapshot(user_files) == before


def test_unwritable_parent_is_refused_before_loading(capsys, tmp_path):
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write to a read-only directory (root)")
        rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16", "--out", str(ro / "a" / "b"))
        assert rc == 2 and "is not writable" in _one_line_error(err)
    finally:
        ro.chmod(0o755)


def test_save_refuses_a_foreign_directory_and_replaces_a_checkpoint_atomically(tiny_ckpt, user_files, tmp_path):
    from hadakit.outdir import OutputDirError

    model, tok = load_quantized_model(tiny_ckpt)
    recipe = get_recipe("w4a16_g128:hadamard:rtn")
    before = _snapshot(user_files)
    with pytest.raises(OutputDirError, match="not a hadakit checkpoint"):
        save_quantized_model(model, tok, recipe, user_files, force=True)
    assert _snapshot(user_files) == before
    out = _copy(tiny_ckpt, tmp_path / "saves" / "ckpt")
    (out / "stale.txt").write_text("from the previous save")
    save_quantized_model(model, tok, recipe, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "hadakit.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # no temporary or backup left


# --- item 13: killed saves are cleaned up; normal directory mode ---------------------------------------------------

def test_stale_temporaries_of_killed_saves_are_removed_and_mode_follows_umask(tiny_ckpt, tmp_path):
    model, tok = load_quantized_model(tiny_ckpt)
    recipe = get_recipe("w4a16_g128:hadamard:rtn")
    dead = tmp_path / ".ckpt.tmp-999999999-deadbeef"  # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".ckpt.tmp-{os.getpid()}-cafecafe"  # this process: maybe still writing
    alive.mkdir()
    other = tmp_path / ".other.tmp-999999999-deadbeef"  # another checkpoint's: not ours to judge
    other.mkdir()
    old_umask = os.umask(0o022)
    try:
        out = save_quantized_model(model, tok, recipe, tmp_path / "ckpt")
    finally:
        os.umask(old_umask)
    assert not dead.exists() and alive.exists() and other.exists()
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}


# --- items 2 and 11: nothing from a directory is executed; names from files are checked -----------------------------

def _evil_dir(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evilmodel'\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilmodel", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                     "AutoModelForCausalLM": "evil.EvilModel"}}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder


def test_auto_map_code_in_a_model_directory_is_never_imported(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    evil = _evil_dir(tmp_path / "evil", marker)
    monkeypatch.setattr("sys.stdin", None)  # a prompt ("run the custom code? [y/N]") would fail here, not hang
    with pytest.raises(ValueError, match=r"never runs code .*trust_remote_code=False"):
        load_model(evil)
    rc, err = _run(capsys, "quantize", "--model", str(evil), "--recipe", "w4a16:hadamard:rtn")
    assert rc == 2 and "auto_map" in _one_line_error(err)
    assert not marker.exists()


def test_auto_map_code_in_a_checkpoint_is_never_imported(tiny_ckpt, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    ck = _copy(tiny_ckpt, tmp_path / "ckpt")
    evil = _evil_dir(tmp_path / "evil", marker)
    shutil.copy(evil / "evil.py", ck / "evil.py")
    shutil.copy(evil / "config.json", ck / "config.json")
    monkeypatch.setattr("sys.stdin", None)
    with pytest.raises(ValueError, match="never runs code"):
        load_quantized_model(ck)
    rc, err = _run(capsys, "eval", str(ck))
    assert rc == 2 and "never runs code" in _one_line_error(err, "eval")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["AutoTokenizer", "os", "__import__", "PretrainedConfig", "not a name"])
def test_model_class_from_hadakit_json_must_be_a_transformers_model_class(tiny_ckpt, tmp_path, name):
    ck = _copy(tiny_ckpt, tmp_path / "ckpt")
    meta = json.loads((ck / "hadakit.json").read_text())
    meta["model_class"] = name
    (ck / "hadakit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"hadakit\.json.*(not a model class|not a class name|has no model class)"):
        load_quantized_model(ck)


def test_architectures_from_config_json_must_be_a_model_class(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "model")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["AutoTokenizer"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*architectures.*not a model class"):
        load_model(d)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format_version": 1}'])
def test_broken_hadakit_json_names_the_file(tiny_ckpt, tmp_path, capsys, content):
    ck = _copy(tiny_ckpt, tmp_path / "ckpt")
    (ck / "hadakit.json").write_text(content)
    with pytest.raises(ValueError, match=r"hadakit\.json"):
        load_quantized_model(ck)
    rc, err = _run(capsys, "eval", str(ck))
    assert rc == 2 and str(ck / "hadakit.json") in _one_line_error(err, "eval")


def test_eval_of_a_file_says_it_is_not_a_directory(tiny_ckpt, capsys):
    rc, err = _run(capsys, "eval", str(tiny_ckpt / "recipe.json"))
    assert rc == 2 and "is a file, not a checkpoint directory" in _one_line_error(err, "eval")


# --- item 3: weights that do not match config.json are an error that lists them -----------------------------------

def test_missing_and_unexpected_weights_are_listed(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path / "model")
    state = load_file(str(d / "model.safetensors"))
    gone = "model.layers.0.mlp.down_proj.weight"
    del state[gone]
    state["model.layers.0.surprise"] = torch.zeros(3)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"do not match its config\.json \(missing keys: {gone}; "
                                         rf"unexpected keys: model\.layers\.0\.surprise\)"):
        load_model(d)
    rc, err = _run(capsys, "quantize", "--model", str(d), "--recipe", "w4a16:hadamard:rtn")
    assert rc == 2 and gone in _one_line_error(err)
    # negative control: the untouched copy loads
    load_model(tiny_dir)


def test_truncated_weights_are_a_named_error(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "model")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_model(d)


# --- item 7: no tokenizer files ------------------------------------------------------------------------------------

def test_directory_without_tokenizer_says_so(tiny_dir, tmp_path, capsys):
    d = tmp_path / "model"
    d.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_dir / f).exists():
            shutil.copy(tiny_dir / f, d / f)
    with pytest.warns(UserWarning, match="no tokenizer files in"):
        _, tok = load_model(d)
    assert tok is None
    rc, err = _run(capsys, "quantize", "--model", str(d), "--recipe", "w4a16:hadamard:rtn", "--windows", "1",
                   "--window-len", "16")
    assert rc == 2 and f"no tokenizer files in {d}" in _one_line_error(err)


# --- items 4, 10, 11: every argument checked before the model is loaded ---------------------------------------------

@pytest.mark.parametrize("flag", ["--calib-windows", "--windows", "--window-len", "--calib-len"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_counts_must_be_positive(capsys, flag, value):
    rc, err = _run(capsys, "quantize", "--model", NO_MODEL, "--recipe", "w4a16:hadamard:gptq", flag, value)
    assert rc == 2 and "positive integer" in err and flag in err


@pytest.mark.parametrize("argv, expected", [
    (["--recipe", "w4a4:banana"], "rotation"),
    (["--recipe", "w9a9"], "w9a9"),
    (["--recipe", "w4a16:hadamard:gptq:refit=-1"], "refit"),
    (["--device", "banana"], "unknown device 'banana'"),
    (["--text", "/nonexistent/eval.txt"], "no text file at '/nonexistent/eval.txt'"),
    (["--calib-text", "/nonexistent/calib.txt"], "no text file at '/nonexistent/calib.txt'"),
    (["--also-eval", "/nonexistent/other.txt"], "no text file at '/nonexistent/other.txt'"),
])
def test_bad_arguments_fail_before_the_model_is_loaded(capsys, argv, expected):
    rc, err = _run(capsys, "quantize", "--model", NO_MODEL, *(["--recipe", "w4a16:hadamard:rtn"]
                                                                 if "--recipe" not in argv else []), *argv)
    assert rc == 2
    line = _one_line_error(err)
    assert expected in line and "no model at" not in line


def test_cuda_without_a_gpu_is_a_named_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for command in (["quantize", "--model", NO_MODEL], ["inspect", NO_MODEL]):
        rc, err = _run(capsys, *command, "--device", "cuda")
        assert rc == 2 and "no usable CUDA GPU" in _one_line_error(err, command[0])


def test_block_size_that_does_not_divide_fails_right_after_the_load(tiny_dir, capsys, tmp_path):
    rc, err = _run(capsys, "quantize", "--model", str(tiny_dir), "--recipe", "w4a16:block-48:gptq",
                   "--results", str(tmp_path / "res"))
    assert rc == 2 and "48" in _one_line_error(err)
    assert not (tmp_path / "res").exists()  # refused before the FP evaluation wrote anything


# --- items 5 and 6: recipe.json cross-checked; the eval text found from anywhere -------------------------------------

def test_edited_recipe_json_is_refused(tiny_ckpt, tmp_path, capsys):
    ck = _copy(tiny_ckpt, tmp_path / "ckpt")
    load_quantized_model(ck)  # negative control: the untouched copy loads
    recipe = json.loads((ck / "recipe.json").read_text())
    recipe["weight"] = "int8"
    (ck / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    with pytest.raises(ValueError, match=r"recipe\.json was changed after the checkpoint was saved"):
        load_quantized_model(ck)
    rc, err = _run(capsys, "eval", str(ck))
    assert rc == 2 and "was changed after" in _one_line_error(err, "eval")
    # a checkpoint without the hash (older hadakit): the stored tensors' own formats still catch it
    meta = json.loads((ck / "hadakit.json").read_text())
    del meta["recipe_sha256"]
    (ck / "hadakit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match the stored weights of .*element 'int4' stored vs "
                                         r"'int8' in recipe\.json"):
        load_quantized_model(ck)
    recipe["weight"], recipe["act"] = "int4_g128", "int8"
    (ck / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    with pytest.raises(ValueError, match="says the activations are quantized"):
        load_quantized_model(ck)


def test_eval_finds_a_relative_text_from_another_directory_and_notices_changes(tiny_dir, tmp_path, capsys,
                                                                             monkeypatch):
    from hadakit.io.texts import read_text

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "notes.txt").write_text(read_text("macbeth")[:20000])
    monkeypatch.chdir(work)
    rc, err = _run(capsys, "quantize", "--model", str(tiny_dir), "--recipe", "w4a16_g128:hadamard:rtn",
                   "--text", "notes.txt", "--windows", "2", "--window-len", "32", "--no-samples",
                   "--results", "res", "--out", "ck")
    assert rc == 0, err
    saved = json.loads((work / "ck" / "hadakit.json").read_text())["eval"]
    assert saved["text"] == str(work / "notes.txt") and len(saved["text_sha256"]) == 64
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(work / "ck")]) == 0
    assert "identical" in capsys.readouterr().out
    (work / "notes.txt").write_text(read_text("macbeth")[:20001])
    rc, err = _run(capsys, "eval", str(work / "ck"))
    assert rc == 2 and "has changed since" in _one_line_error(err, "eval") and "notes.txt" in err
    (work / "notes.txt").unlink()
    rc, err = _run(capsys, "eval", str(work / "ck"))
    assert rc == 2 and "no longer exists" in _one_line_error(err, "eval")


# --- item 8: broken model-cache entries are detected and rebuilt ---------------------------------------------------

def _fake_gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.weight", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_truncated_or_deleted_cache_files_are_rebuilt(tmp_path, monkeypatch, minilm_dir):
    """The GGUF-to-HF conversion itself (minutes for Gemma) is replaced by a tiny model: what is tested is the
    cache's own bookkeeping on a real file tree."""
    from hadakit.io import loading

    monkeypatch.setenv("HADAKIT_CACHE", str(tmp_path / "cache"))
    gguf_file = _fake_gguf(tmp_path / "tiny.gguf")
    builds = []
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)

    def convert(path):
        builds.append(path)
        return tiny_llama(hidden=32), tok

    monkeypatch.setattr(loading, "_load_gguf_uncached", convert)
    ref, _ = load_model(gguf_file)
    entry = loading.gguf_cache_dir(gguf_file)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact entry loads silently, without a rebuild
        again, _ = load_model(gguf_file)
    assert len(builds) == 1
    weights = next(entry.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match=rf"incomplete or corrupt \({weights.name} has 100 bytes"):
        model, _ = load_model(gguf_file)
    assert len(builds) == 2
    (entry / "config.json").unlink()
    with pytest.warns(UserWarning, match=r"config\.json is missing\): rebuilding"):
        model, _ = load_model(gguf_file)
    assert len(builds) == 3
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref_logits)
