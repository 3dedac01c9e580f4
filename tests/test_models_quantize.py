"""The model pipeline on real models: exact rotations, GPTQ vs RTN, KV cache, save/load, CLI, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import hadakit

from hadakit.formats import fake_quantize, get_scheme
from hadakit.io.texts import calibration_windows, make_windows, read_text
from hadakit.io.loading import load_model
from hadakit.io.checkpoint import checkpoint_size_bytes, load_quantized_model, save_quantized_model
from hadakit.evaluation.compare import packed_size_mb
from hadakit.quantization.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from hadakit.quantization.pipeline import find_decoder_layers, make_rotation, quantize_model
from hadakit.quantization.qlinear import RotatedQuantLinear
from hadakit.quantization.quantizers import SchemeGroupQuantizer
from hadakit.quantization.recipes import QuantRecipe, get_recipe, list_recipes


@pytest.fixture(scope="module")
def gemma():
    model, tok = load_model()
    ids = make_windows(tok, read_text("macbeth"), window=48, n_windows=1)
    return model, tok, ids


def _hidden(model, enc):
    with torch.no_grad():
        return model(**enc).last_hidden_state


# --- recipes ---------------------------------------------------------------------------------------------------

def test_recipe_parsing_and_round_trip(tmp_path):
    r = get_recipe("w4a4:random:gptq")
    assert (r.weight, r.act, r.method, r.rotation.kind) == ("int4_g128", "int4", "gptq", "random")
    b = get_recipe("w4a16_g128:block-128:gptq")
    assert b.rotation.kind == "block" and b.rotation.block_size == 128
    r.save(tmp_path / "r.json")
    assert QuantRecipe.load(tmp_path / "r.json") == r
    assert get_recipe(str(tmp_path / "r.json")) == r
    kv = get_recipe("w4a4kv4")
    assert QuantRecipe.from_dict(json.loads(json.dumps(kv.to_dict()))) == kv
    for name in list_recipes():
        get_recipe(name)
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("w3a3")
    with pytest.raises(ValueError, match="valid rotations: none, hadamard, random"):
        get_recipe("w4a4:spin")
    with pytest.raises(ValueError, match="valid rotations.*block-<b>"):
        get_recipe("w4a4:block")
    with pytest.raises(FileNotFoundError):
        get_recipe(str(tmp_path / "missing.json"))


# --- exactness --------------------------------------------------------------------------------------------------

@pytest.mark.model
def test_rotation_without_quantization_leaves_encoder_unchanged(minilm):
    model, _, enc = minilm
    ref = _hidden(model, enc)
    for spec in ("fp:hadamard", "fp:random", "fp:block-32"):
        m = copy.deepcopy(model)
        report = quantize_model(m, get_recipe(spec))
        assert len(report.quantized) == 36 + 1  # 6 layers x 6 linears + pooler
        out = _hidden(m, enc)
        rel = (out - ref).norm() / ref.norm()
        assert rel <= 1e-5, (spec, rel)


@pytest.mark.model
def test_rotation_without_quantization_leaves_gemma_logits_unchanged(gemma):
    model, _, ids = gemma
    with torch.no_grad():
        ref = model(ids).logits
    m = copy.deepcopy(model)
    report = quantize_model(m, get_recipe("fp:random"))
    assert not report.fallbacks  # 640 = 20·32, 1024 and 2048 all have Hadamard matrices
    assert report.skipped == ["lm_head"]
    with torch.no_grad():
        out = m(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert rel <= 1e-4, rel


@pytest.mark.model
def test_rotation_helps_w4a4_on_encoder(minilm):
    model, _, enc = minilm
    ref = _hidden(model, enc)
    errs = {}
    for spec in ("w4a4:none", "w4a4:random"):
        m = copy.deepcopy(model)
        quantize_model(m, get_recipe(spec))
        errs[spec] = ((_hidden(m, enc) - ref).norm() / ref.norm()).item()
    assert errs["w4a4:random"] < 0.7 * errs["w4a4:none"], errs  # measured: 0.47 vs 0.87


# --- GPTQ ---------------------------------------------------------------------------------------------------------

@pytest.mark.model
def test_gptq_beats_rtn_on_a_real_layer(gemma):
    model, tok, _ = gemma
    layer = find_decoder_layers(model)[0]
    lin = layer.mlp.down_proj
    xs = []
    h = lin.register_forward_pre_hook(lambda mod, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    calib = calibration_windows(tok, "lear", n_windows=2, window=96)
    with torch.no_grad():
        for row in calib:
            model.model(row[None])  # the decoder only: skip the 262k-entry LM head
    h.remove()
    x = torch.cat(xs)
    rot = make_rotation(get_recipe("w4a16_g128:random"), "model.layers.0.mlp.down_proj", x.shape[1])
    xr, w = rot(x), rot(lin.weight.detach())
    acc = HessianAccumulator(x.shape[1])
    acc.add(xr)
    scheme = get_scheme("int4_g128")
    gq = SchemeGroupQuantizer(scheme, w)
    q_gptq = gptq_quantize(w, acc.h, gq, GPTQConfig())
    q_rtn = fake_quantize(w, scheme)
    ref = x @ lin.weight.detach().T
    err_gptq = ((xr @ q_gptq.T - ref) ** 2).mean()
    err_rtn = ((xr @ q_rtn.T - ref) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    # the packed result dequantizes to exactly GPTQ's values
    assert torch.equal(gq.packed().dequantize(torch.float32), q_gptq)


def test_gptq_act_order_and_formats_pack_exactly():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(512, 256) * torch.linspace(0.2, 3.0, 256)
    acc = HessianAccumulator(256)
    acc.add(x)
    for name in ("int4_g128", "mxfp4", "nvfp4", "int4_g128_asym", "int8"):
        for act_order in (False, True):
            gq = SchemeGroupQuantizer(get_scheme(name), w)
            q = gptq_quantize(w, acc.h, gq, GPTQConfig(act_order=act_order))
            assert torch.equal(gq.packed().dequantize(torch.float32), q), (name, act_order)
            err = ((x @ (q - w).T) ** 2).mean()
            err_rtn = ((x @ (fake_quantize(w, name) - w).T) ** 2).mean()
            assert err < err_rtn, (name, act_order)


def test_gptq_scale_refit_lowers_the_hessian_error_and_packs_exactly():
    torch.manual_seed(3)
    w = torch.randn(64, 384)
    x = torch.randn(2048, 384) * torch.linspace(0.2, 3.0, 384)
    x[:, :4] *= 8  # a few strong input channels, as in real activations
    acc = HessianAccumulator(384)
    acc.add(x)
    h = acc.h

    def herr(q):  # the error GPTQ minimizes, on the damped Hessian it used
        hd = h + 0.01 * torch.diagonal(h).mean() * torch.eye(384, dtype=h.dtype)
        e = (w - q).double()
        return float(((e @ hd) * e).sum())

    for name in ("int4_g128", "int4", "nvfp4"):
        errs = []
        for refit in (0, 1, 2):
            gq = SchemeGroupQuantizer(get_scheme(name), w)
            q = gptq_quantize(w, h, gq, GPTQConfig(refit=refit))
            assert torch.equal(gq.packed().dequantize(torch.float32), q), (name, refit)
            errs.append(herr(q))
        assert errs[1] < errs[0] and errs[2] < errs[1], (name, errs)
    # power-of-two scales, zero points, one scale per tensor: refit may not apply, the result still packs exactly
    per_tensor = get_scheme("int8").replace(granularity="per_tensor")
    for scheme in (get_scheme("mxfp4"), get_scheme("int4_g128_asym"), per_tensor):
        gq = SchemeGroupQuantizer(scheme, w)
        q = gptq_quantize(w, h, gq, GPTQConfig(refit=2))
        assert torch.equal(gq.packed().dequantize(torch.float32), q), scheme


def test_refit_scales_is_the_least_squares_solution_rounded_to_the_scale_format():
    torch.manual_seed(5)
    w = torch.randn(8, 256, dtype=torch.float64)
    x = torch.randn(1024, 256, dtype=torch.float64) * torch.linspace(0.3, 2.0, 256, dtype=torch.float64)
    h = x.T @ x / 1024
    scheme = get_scheme("int4_g128")
    gq = SchemeGroupQuantizer(scheme, w.float())
    for g0 in (0, 128):  # plain RTN codes: one fit per group
        params = gq.fit(w[:, g0:g0 + 128].float())
        for c in range(g0, g0 + 128):
            gq.quantize_column(w[:, c].float(), params, c)
    new = gq.refit_scales(w, h)
    v = scheme.element.decode(gq.codes, torch.float64, signed=True)
    lc = torch.linalg.cholesky(h)
    for r in range(8):
        basis = torch.zeros(256, 2, dtype=torch.float64)
        basis[:128, 0], basis[128:, 1] = v[r, :128], v[r, 128:]
        # argmin_s (w - B s)ᵀ H (w - B s) by least squares on H's Cholesky factor
        s_ls = torch.linalg.lstsq(lc.T @ basis, lc.T @ w[r]).solution
        s_fp16 = s_ls.to(torch.float16).to(torch.float64)
        got = torch.tensor([float(new[i].s_eff[r, 0]) for i in range(2)], dtype=torch.float64)
        old = torch.tensor([float(gq._s_eff[i][r, 0]) for i in range(2)], dtype=torch.float64)

        def err(s):
            e = w[r] - basis @ s
            return float(e @ h @ e)

        assert torch.equal(got, s_fp16) or torch.equal(got, old), (r, got, s_fp16, old)
        assert err(got) <= err(old)
        if err(s_fp16) < err(old):
            assert torch.equal(got, s_fp16)


@pytest.mark.parametrize("name", ["int4_g128", "int4_g128_asym", "int8", "int4"])
def test_int_column_fast_path_matches_generic_quantizer(name):
    # The direct INT route GPTQ takes per column must give the generic formats path's codes and values bit for bit,
    # dead (all-zero) groups and ties included.
    torch.manual_seed(1)
    w = torch.randn(48, 256) * 3
    w[:7, :128] = 0.0  # all-zero groups: zero scale, never divided by
    w[7:, 5] = 0.5 * torch.round(w[7:, 5] * 2)  # values on half-steps of a coarse grid exercise ties to even
    scheme = get_scheme(name)
    fast = SchemeGroupQuantizer(scheme, w)
    slow = SchemeGroupQuantizer(scheme, w)
    slow._int_fast = False
    assert fast._int_fast
    g = fast.group_size
    for c in range(w.shape[1]):
        params = fast.fit(w[:, c - c % g:c - c % g + g])
        assert torch.equal(fast.quantize_column(w[:, c], params, c), slow.quantize_column(w[:, c], params, c)), c
    assert torch.equal(fast.codes, slow.codes)
    assert torch.equal(fast.packed().dequantize(torch.float32), slow.packed().dequantize(torch.float32))


def test_hessian_accumulation_matches_float64():
    # float32 Gram matrices per batch, summed in float64: the running mean equals the float64 Hessian
    torch.manual_seed(2)
    xs = [torch.randn(100, 32) * torch.linspace(0.1, 5, 32) for _ in range(7)]
    acc = HessianAccumulator(32)
    acc.flush_rows = 250  # several flushes, and rows still pending when .h is read
    for x in xs:
        acc.add(x)
    x = torch.cat(xs).double()
    torch.testing.assert_close(acc.h, 2 * x.T @ x / x.shape[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [100, 640, 1000, 1026])  # one block, 2 blocks, 4 uneven blocks
def test_symmetric_gram_equals_the_full_product_and_is_exactly_symmetric(n):
    from hadakit.quantization.gptq import symmetric_gram

    torch.manual_seed(n)
    x = torch.randn(200, n) * torch.linspace(0.1, 3, n)
    g = symmetric_gram(x)
    ref = x.double().T @ x.double()
    assert torch.equal(g, g.T)
    assert float((g.double() - ref).abs().max()) < 1e-6 * float(ref.abs().max())


def test_upper_cholesky_of_inverse_matches_the_three_step_form():
    from hadakit.quantization.gptq import upper_cholesky_of_inverse

    torch.manual_seed(4)
    x = torch.randn(300, 96, dtype=torch.float64) * torch.linspace(0.1, 4, 96, dtype=torch.float64)
    h = x.T @ x + 0.01 * torch.eye(96, dtype=torch.float64)
    u = upper_cholesky_of_inverse(h)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    assert torch.equal(u, torch.triu(u)) and bool((torch.diagonal(u) > 0).all())
    torch.testing.assert_close(u, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(u.T @ u @ h, torch.eye(96, dtype=torch.float64), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="not positive definite"):
        upper_cholesky_of_inverse(-h)


def test_linears_sharing_an_input_share_their_statistics(gemma):
    # q/k/v read the same normed hidden state, gate/up the same MLP input: one leader records for each group
    from hadakit.quantization.pipeline import _input_groups, capture_layer_inputs, find_linears

    model, tok, ids = gemma
    layers = find_decoder_layers(model)
    linears, _ = find_linears(model, get_recipe("w4a16_g128"))
    names = {n: m for n, m in linears.items() if n.startswith("model.layers.0.")}
    inputs, kwargs = capture_layer_inputs(model, layers, ids)
    leader = _input_groups(layers[0], names, inputs[0], kwargs[0])
    short = {n.split(".")[-1]: leader[n].split(".")[-1] for n in names}
    assert short == {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
                     "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}, short


@pytest.mark.model
def test_true_sequential_calibration_sees_the_quantized_earlier_linears(minilm, monkeypatch):
    # With seq, every linear's Hessian is taken from the layer with the linears before it already quantized: in
    # layer 0 (whose inputs do not depend on quantization) it equals the Hessian of the final model's own inputs.
    # Without it, linears after the first group see the full-precision layer, so their Hessians differ.
    from hadakit.quantization import pipeline

    model, tok, _ = minilm
    calib = calibration_windows(tok, "lear", n_windows=2, window=32, add_bos=False)

    def hessians(spec):
        m = copy.deepcopy(model)
        seen = {}
        real = pipeline._replace

        def spy(model_, name, mod, recipe, report, hessian=None, **kw):
            if ".layer.0." in name:
                seen[name] = hessian.clone()
            return real(model_, name, mod, recipe, report, hessian=hessian, **kw)

        monkeypatch.setattr(pipeline, "_replace", spy)
        quantize_model(m, get_recipe(spec), calib=calib)
        monkeypatch.setattr(pipeline, "_replace", real)
        actual = {n: HessianAccumulator(seen[n].shape[0]) for n in seen}
        hooks = [m.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: actual[n].add(args[0]))
                 for n in seen]
        with torch.no_grad():
            for row in calib:
                m(row[None])
        for hk in hooks:
            hk.remove()
        return {n: (seen[n], actual[n].h) for n in seen}

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    seq = hessians("w4a16_g128:hadamard:gptq:seq")
    assert len(seq) == 6
    for n, (recorded, actual) in seq.items():
        assert rel(recorded, actual) < 1e-5, n
    plain = hessians("w4a16_g128:hadamard:gptq")
    late = [n for n in plain if not n.endswith(("query", "key", "value"))]
    assert len(late) == 3 and all(rel(*plain[n]) > 1e-3 for n in late), {n: rel(*plain[n]) for n in late}


def test_corrected_weight_is_the_least_squares_map_to_the_full_precision_outputs():
    # W* = argmin ‖W·r − W*·x̃‖² (+ a small pull toward W): checked against float64 lstsq, and W* = W when the
    # quantized model's inputs equal the full-precision ones. The cross products accumulate over several batches.
    from hadakit.quantization.gptq import corrected_weight

    torch.manual_seed(0)
    r = torch.randn(3000, 48) * torch.linspace(0.3, 2.0, 48)
    x = r + 0.2 * torch.randn_like(r)  # the perturbed stream
    w = torch.randn(24, 48)
    acc = HessianAccumulator(48, cross=True)
    for a, b in zip(x.split(700), r.split(700)):
        acc.add(a, b)
    best = torch.linalg.lstsq(x.double(), (r @ w.T).double()).solution.T
    got = corrected_weight(w, acc.h, acc.c, damp=1e-9)
    assert (got.double() - best).abs().max() < 1e-4 * best.abs().max()
    assert (w.double() - best).abs().max() > 0.05 * best.abs().max()  # the correction is not negligible
    same = HessianAccumulator(48, cross=True)
    same.add(r, r)
    assert torch.equal(corrected_weight(w, same.h, same.c), w)
    with pytest.raises(ValueError, match="reference rows"):
        same.add(r)
    with pytest.raises(ValueError, match="do not pair"):
        same.add(r, r[:10])


@pytest.mark.model
def test_fptarget_pairs_each_linear_with_the_full_precision_models_inputs(minilm, monkeypatch):
    # fptarget records C = 2/N·Σ r·x̃ᵀ with r the full-precision model's inputs of the linear and x̃ the quantized
    # model's: in layer 0 the two streams agree (C = H), in layer 1 r comes from the untouched model and x̃ from the
    # final one (layer 0 quantized). And it fits the full-precision model better on its calibration windows than
    # true-sequential GPTQ alone (which it implies).
    from hadakit.quantization import pipeline

    model, tok, _ = minilm
    calib = calibration_windows(tok, "lear", n_windows=2, window=32, add_bos=False)
    seen = {}
    real = pipeline._replace

    def spy(model_, name, mod, recipe, report, hessian=None, cross=None, **kw):
        if name.endswith("attention.self.query") and (".layer.0." in name or ".layer.1." in name):
            seen[name] = (hessian.clone(), cross.clone())
        return real(model_, name, mod, recipe, report, hessian=hessian, cross=cross, **kw)

    monkeypatch.setattr(pipeline, "_replace", spy)
    m = copy.deepcopy(model)
    quantize_model(m, get_recipe("w4a16_g128:hadamard:gptq:fptarget"), calib=calib)
    monkeypatch.setattr(pipeline, "_replace", real)
    h0, c0 = seen["encoder.layer.0.attention.self.query"]
    assert torch.equal(h0, c0)
    name1 = "encoder.layer.1.attention.self.query"

    def inputs(mod_model):
        xs = []
        hk = mod_model.get_submodule(name1).register_forward_pre_hook(lambda mod, args: xs.append(args[0][0]))
        with torch.no_grad():
            for row in calib:
                mod_model(row[None])
        hk.remove()
        return torch.cat(xs).double()

    r, xq = inputs(model), inputs(m)
    h1, c1 = seen[name1]
    assert float((c1 - 2 * r.T @ xq / r.shape[0]).norm() / c1.norm()) < 1e-5
    assert float((h1 - 2 * xq.T @ xq / r.shape[0]).norm() / h1.norm()) < 1e-5
    assert float((c1 - h1).norm() / h1.norm()) > 1e-3  # layer 0's quantization reached layer 1

    def output_error(spec):
        q = copy.deepcopy(model)
        quantize_model(q, get_recipe(spec), calib=calib)
        with torch.no_grad():
            return sum(float(((q(row[None]).last_hidden_state - model(row[None]).last_hidden_state) ** 2).sum())
                       for row in calib)

    plain, fpt = output_error("w4a16_g128:hadamard:gptq:seq"), output_error("w4a16_g128:hadamard:gptq:fptarget")
    assert fpt < 0.8 * plain, (fpt, plain)
    r = get_recipe("w4a16_g128:hadamard:gptq:fptarget=0.5")
    assert (r.fp_target, r.sequential, r.label()) == (0.5, True, "w4a16_g128 hadamard gptq +seq,fptarget=0.5")
    with pytest.raises(ValueError, match="sequential"):
        QuantRecipe(weight="int4_g128", method="gptq", fp_target=0.25)
    with pytest.raises(ValueError, match="strength"):
        get_recipe("w4a16_g128:hadamard:gptq:fptarget=2")


# --- KV cache, save / load ------------------------------------------------------------------------------------------

@pytest.mark.model
def test_save_load_reproduces_outputs_bit_for_bit(minilm, tmp_path):
    model, tok, enc = minilm
    m = copy.deepcopy(model)
    recipe = get_recipe("w4a4kv4:random")
    report = quantize_model(m, recipe)
    assert report.kv_modules == 6
    out = _hidden(m, enc)
    ckpt = save_quantized_model(m, tok, recipe, tmp_path / "ckpt")
    # the file holds the packed weights (4.125 bits each) and the other tensors as they are, plus small JSON
    # and tokenizer files: far below the fp32 model
    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    size_mb = checkpoint_size_bytes(ckpt) / 1e6
    assert packed_size_mb(m) < size_mb < packed_size_mb(m) + 2.0
    assert size_mb < fp32_mb - 0.8 * sum(mod.weight.numel() * 4 for mod in m.modules()
                                          if isinstance(mod, RotatedQuantLinear)) / 1e6
    m2, tok2 = load_quantized_model(ckpt)
    assert torch.equal(_hidden(hadakit.load(ckpt), enc), out)
    assert torch.equal(_hidden(m2, enc), out)
    assert tok2 is not None
    with pytest.raises(FileExistsError, match="--force"):
        save_quantized_model(m, tok, recipe, ckpt)
    save_quantized_model(m, tok, recipe, ckpt, force=True)  # replaced atomically
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp")]


@pytest.mark.model
def test_store_bf16_halves_the_unquantized_tensors_and_reloads_bit_for_bit(minilm, tmp_path):
    from safetensors import safe_open

    model, tok, enc = minilm
    emb = model.embeddings.word_embeddings.weight
    sizes, outs = {}, {}
    for spec in ("w4a16_g128:hadamard:rtn", "w4a16_g128:hadamard:rtn:store=bf16"):
        m = copy.deepcopy(model)
        recipe = get_recipe(spec)
        report = quantize_model(m, recipe)
        outs[spec] = _hidden(m, enc)
        ckpt = save_quantized_model(m, tok, recipe, tmp_path / spec.replace(":", "_"))
        sizes[spec] = checkpoint_size_bytes(ckpt)
        assert torch.equal(_hidden(hadakit.load(ckpt), enc), outs[spec]), spec
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            stored = f.get_tensor("embeddings.word_embeddings.weight")
        if recipe.store_dtype:
            assert report.stored_rounded >= emb.numel()
            assert stored.dtype == torch.bfloat16
            assert torch.equal(m.embeddings.word_embeddings.weight, emb.to(torch.bfloat16).float())
        else:
            assert stored.dtype == torch.float32 and torch.equal(stored, emb)
    saved = sizes["w4a16_g128:hadamard:rtn"] - sizes["w4a16_g128:hadamard:rtn:store=bf16"]
    assert saved > 0.95 * emb.numel() * 2, (sizes, emb.numel())
    # the rounding moves the outputs only a little
    a, b = outs.values()
    assert float((a - b).norm() / a.norm()) < 1e-2
    with pytest.raises(ValueError, match="store_dtype"):
        get_recipe("w4a16_g128:hadamard:rtn:store=int8")


@pytest.mark.model
def test_kv_quantization_changes_attention_only_through_kv(minilm):
    model, _, enc = minilm
    ref = _hidden(model, enc)
    m = copy.deepcopy(model)
    report = quantize_model(m, get_recipe("kv4"))
    assert report.kv_modules == 6 and not report.quantized
    out = _hidden(m, enc)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_quantized_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a hadakit checkpoint"):
        load_quantized_model(tmp_path / "empty")


def test_model_without_layers_or_attention_gives_clear_errors():
    net = torch.nn.Sequential(torch.nn.ReLU())
    with pytest.raises(ValueError, match="no linear layer"):
        quantize_model(net, get_recipe("w4a4"))
    with pytest.raises(ValueError, match="no attention module"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), get_recipe("kv4"))
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), get_recipe("w4a16:hadamard:gptq"))


def test_unsupported_layer_size_falls_back_and_says_so():
    net = torch.nn.Sequential(torch.nn.Linear(104, 16))  # 104 = 52·2 (Paley II, q = 25): exact Hadamard
    net3 = torch.nn.Sequential(torch.nn.Linear(46, 16))  # 46 = 23·2: no Hadamard matrix, orthogonal fallback
    assert not quantize_model(net, get_recipe("w4a16:hadamard")).fallbacks
    x = torch.randn(3, 46)
    ref = net3(x)
    report = quantize_model(net3, get_recipe("fp:hadamard"))
    assert "0" in report.fallbacks and "fallback" in report.fallbacks["0"]
    assert "fallback" in report.summary()
    torch.testing.assert_close(net3(x), ref, atol=1e-5, rtol=1e-5)
    strict = get_recipe("fp:hadamard")
    strict = QuantRecipe.from_dict({**strict.to_dict(), "rotation": {**strict.to_dict()["rotation"], "fallback": None}})
    with pytest.raises(ValueError, match="layer 0: .*Nearest supported sizes: 44, 48"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(46, 16)), strict)


# --- CLI ------------------------------------------------------------------------------------------------------------

@pytest.mark.model
def test_cli_compare_end_to_end_on_default_model(tmp_path, capsys):
    from hadakit.cli.main import main

    rc = main(["quantize", "--compare", "--recipe", "w4a4:none:rtn", "--recipe", "w4a4:random:rtn",
               "--recipe", "w4a4:random:rtn:smooth=search,aclip=search", "--calib-windows", "2", "--calib-len", "64",
               "--windows", "2", "--window-len", "64", "--also-eval", "macbeth", "--results", str(tmp_path),
               "--no-samples"])
    assert rc == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels == ["fp", "w4a4 none rtn", "w4a4 random rtn", "w4a4 random rtn +smooth=search,aclip=search"]
    ppl = {r["label"]: r["ppl"] for r in data["rows"]}
    assert ppl["fp"] < ppl["w4a4 random rtn"] < ppl["w4a4 none rtn"]
    held = {r["label"]: r["extra_ppl"]["macbeth"] for r in data["rows"]}
    assert held["fp"] < held["w4a4 random rtn"] < held["w4a4 none rtn"]
    assert data["rows"][0]["extra_ratio"]["macbeth"] == 1.0
    assert all(r["peak_rss_mb"] > 100 for r in data["rows"])
    assert (tmp_path / "compare.md").read_text().count("|") > 20
    assert "PPL macbeth" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "compare-time.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "w4a4 random rtn" in out and "x FP" in out


def test_cli_refuses_existing_out_dir(tmp_path, capsys):
    from hadakit.cli.main import main

    (tmp_path / "exists").mkdir()
    rc = main(["quantize", "--recipe", "w4a4", "--out", str(tmp_path / "exists")])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
    rc = main(["quantize", "--model", str(tmp_path / "missing"), "--recipe", "w4a4"])
    assert rc == 2
    assert "no model at" in capsys.readouterr().err
