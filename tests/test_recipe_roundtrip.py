"""Recipe string and JSON forms: ``QuantRecipe.spec()`` is canonical (``get_recipe(r.spec()) == r``, a fixed point,
one spelling per recipe), ``to_dict`` / ``from_dict`` round-trip exactly, and bad JSON, bad strings and bad direct
construction all get the same named errors (one ``_validate``)."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hadakit.quantization.gptq import GPTQConfig
from hadakit.quantization.recipes import METHODS, QuantRecipe, RotationConfig, get_recipe, list_recipes
from hadakit.transforms.plan import supported

BLOCKS = [n for n in (4, 8, 12, 16, 20, 24, 28, 32, 40, 64, 128, 256, 1024) if supported(n)]
ROTATIONS = ["none", "hadamard", "random", *(f"block-{n}" for n in BLOCKS)]


def _json(r: QuantRecipe) -> QuantRecipe:
    return QuantRecipe.from_dict(json.loads(json.dumps(r.to_dict())))


def _check(text: str) -> QuantRecipe:
    """``text`` parses; its spec parses back to the same recipe, is a fixed point, is str(); JSON round-trips."""
    r = get_recipe(text)
    s = r.spec()
    assert get_recipe(s) == r, (text, s)
    assert get_recipe(s).spec() == s, (text, s)
    assert str(r) == s
    assert _json(r) == r, text
    return r


# ---------------------------------------------------------------------------------------------------------------
# String form
# ---------------------------------------------------------------------------------------------------------------


def test_every_preset_rotation_and_method_round_trips():
    assert BLOCKS[:3] == [4, 8, 12] and 1024 in BLOCKS
    specs = set()
    for name in list_recipes():
        assert _check(name).spec() == f"{name}:none:rtn"
        for rot in ROTATIONS:
            assert get_recipe(f"{name}:{rot}") == get_recipe(f"{name}:{rot}:rtn")
            for method in METHODS:
                r = _check(f"{name}:{rot}:{method}")
                assert r.spec() == f"{name}:{rot}:{method}"
                specs.add(r.spec())
    assert len(specs) == len(list_recipes()) * len(ROTATIONS) * len(METHODS)


# Pinned: these strings (README / tests) give the very recipes they gave before spec() existed, and their specs.
PINNED = [
    ("w4a4:random:gptq:smooth=search,aclip=search,wclip,fptarget",
     QuantRecipe(name="w4a4", weight="int4_g128", act="int4", method="gptq", rotation=RotationConfig("random"),
                 smooth="search", act_clip="search", weight_clip=True, sequential=True, fp_target=0.5),
     "w4a4:random:gptq:smooth=search,aclip=search,wclip,fptarget=0.5"),
    ("w4a16_g128:block-128:gptq:refit=2,store=bf16",
     QuantRecipe(name="w4a16_g128", weight="int4_g128", method="gptq", rotation=RotationConfig("block", 128),
                 gptq=GPTQConfig(refit=2), store_dtype="bf16"),
     "w4a16_g128:block-128:gptq:refit=2,store=bf16"),
    ("w4a16_g128:block-128:gptq:refit=2,actorder,seq,wclip,store=bf16",
     QuantRecipe(name="w4a16_g128", weight="int4_g128", method="gptq", rotation=RotationConfig("block", 128),
                 gptq=GPTQConfig(refit=2, act_order=True), sequential=True, weight_clip=True, store_dtype="bf16"),
     "w4a16_g128:block-128:gptq:wclip,actorder,refit=2,seq,store=bf16"),
    ("w4a4:random:rtn:smooth=search,aclip=search",
     QuantRecipe(name="w4a4", weight="int4_g128", act="int4", rotation=RotationConfig("random"), smooth="search",
                 act_clip="search"),
     "w4a4:random:rtn:smooth=search,aclip=search"),
    ("w4a4:random:rtn:fusevo,learn,steps=5",
     QuantRecipe(name="w4a4", weight="int4_g128", act="int4", rotation=RotationConfig("random"), fuse_values=True,
                 learned="affine", learn_steps=5),
     "w4a4:random:rtn:fusevo,learn=affine,steps=5"),
    ("w8a8", QuantRecipe(name="w8a8", weight="int8", act="int8"), "w8a8:none:rtn"),
    ("kv4:none:rtn:kvcenter,sinks=4",
     QuantRecipe(name="kv4", kv=dict(element="int4", granularity="per_row", symmetric=False, scale_format="fp16"),
                 kv_center=True, kv_sink_tokens=4),
     "kv4:none:rtn:kvcenter,sinks=4"),
]


@pytest.mark.parametrize("text,expected,spec", PINNED, ids=[p[0] for p in PINNED])
def test_pinned_strings_keep_their_recipes(text, expected, spec):
    assert _check(text) == expected
    assert expected.spec() == spec


def test_kv_options_pinned():
    from hadakit.formats import get_scheme

    r = _check("w4a4kv4:random:gptq:kvgroup=64,sinks=1,kvcenter")
    kv = get_scheme(r.kv)
    assert (kv.granularity, kv.group_size, kv.clip_search, r.kv_sink_tokens, r.kv_center) == ("group", 64, False, 1,
                                                                                              True)
    assert r.spec() == "w4a4kv4:random:gptq:kvgroup=64,kvcenter,sinks=1"
    # kvclip then kvgroup builds the same kv scheme dict as the other order
    assert get_recipe("kv4:none:rtn:kvclip,kvgroup=32") == get_recipe("kv4:none:rtn:kvgroup=32,kvclip")


@pytest.mark.parametrize("spellings,spec", [
    (["w4a4", "w4a4:none", "w4a4:none:rtn", "w4a4::", "w4a4:none:rtn:", "w4a4:none:rtn:,"], "w4a4:none:rtn"),
    (["w4a16_g128:hadamard:gptq:refit", "w4a16_g128:hadamard:gptq:refit=1"], "w4a16_g128:hadamard:gptq:refit=1"),
    (["w4a16_g128:hadamard:gptq:fptarget", "w4a16_g128:hadamard:gptq:seq,fptarget=0.5",
      "w4a16_g128:hadamard:gptq:fptarget=0.50,seq"], "w4a16_g128:hadamard:gptq:fptarget=0.5"),
    (["w4a4:random:rtn:learn", "w4a4:random:rtn:learn=affine,steps=40", "w4a4:random:rtn:steps=40,learn"],
     "w4a4:random:rtn:learn=affine"),
    (["w4a4:random:rtn:aclip=1", "w4a4:random:rtn:aclip=1.0", "w4a4:random:rtn:aclip=1e0"], "w4a4:random:rtn:aclip=1"),
    (["w4a4kv4:random:rtn:sinks=0", "w4a4kv4:random:rtn"], "w4a4kv4:random:rtn"),
    (["w4a4kv4:random:rtn:kvclip,wclip,kvgroup=16,wclip", "w4a4kv4:random:rtn:wclip,kvgroup=16,kvclip"],
     "w4a4kv4:random:rtn:wclip,kvgroup=16,kvclip"),
])
def test_spellings_of_one_recipe_share_one_spec(spellings, spec):
    for text in spellings:
        assert _check(text).spec() == spec, text


def test_different_option_sets_give_different_specs():
    texts = ["w4a4:random:gptq", "w4a4:random:gptq:wclip", "w4a4:random:gptq:actorder", "w4a4:random:gptq:refit=1",
             "w4a4:random:gptq:refit=2", "w4a4:random:gptq:seq", "w4a4:random:gptq:fptarget=0.5",
             "w4a4:random:gptq:fptarget=0.25", "w4a4:random:gptq:smooth=0.5", "w4a4:random:gptq:smooth=search",
             "w4a4:random:gptq:aclip=0.5", "w4a4:hadamard:gptq", "w4a4:block-32:gptq", "w4a4:block-64:gptq",
             "w4a4:random:rtn", "w4a4kv4:random:gptq", "w4a4:random:gptq:store=bf16", "w4a4:random:gptq:store=fp16",
             "w4a4:random:gptq:learn=affine", "w4a4:random:gptq:learn=orthogonal", "w4a4:random:gptq:fusevo"]
    specs = [get_recipe(t).spec() for t in texts]
    assert len(set(specs)) == len(texts), specs
    recipes = [get_recipe(t) for t in texts]
    assert all(a != b for i, a in enumerate(recipes) for b in recipes[i + 1:])


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: random valid option subsets, in random order and spelling
# ---------------------------------------------------------------------------------------------------------------

_unit = st.one_of(st.floats(0.0, 1.0, allow_nan=False).map(repr), st.sampled_from(["0", "1", "0.5", ".25", "1e-3"]))


@st.composite
def recipe_strings(draw) -> str:
    name = draw(st.sampled_from(list_recipes()))
    base = get_recipe(name)
    rot = draw(st.sampled_from(ROTATIONS))
    method = draw(st.sampled_from(METHODS))
    w, a, kv = base.weight is not None, base.act is not None, base.kv is not None
    pool = ["store"]
    if w or a:
        pool += ["smooth", "aclip", "learn"]
    if w:
        pool.append("wclip")
    if method == "gptq" and w:
        pool += ["actorder", "refit", "fptarget", "seq"]
    if rot in ("hadamard", "random"):
        pool.append("fusevo")
    if kv:
        pool += ["kvgroup", "kvclip", "kvcenter", "sinks"]
    keys = sorted(draw(st.sets(st.sampled_from(pool))))
    items = []
    for k in keys:
        if k == "smooth":
            items.append("smooth=" + draw(st.one_of(st.just("search"), _unit)))
        elif k == "aclip":
            items.append("aclip=" + draw(st.one_of(st.just("search"), st.floats(1e-9, 1.0).map(repr))))
        elif k == "learn":
            items.append(draw(st.sampled_from(["learn", "learn=affine", "learn=orthogonal"])))
            if draw(st.booleans()):
                items.append(f"steps={draw(st.integers(1, 500))}")
        elif k == "refit":
            items.append(draw(st.one_of(st.just("refit"), st.integers(1, 6).map(lambda n: f"refit={n}"))))
        elif k == "fptarget":
            strength = st.floats(1e-6, 1.0).map(repr)
            items.append(draw(st.one_of(st.just("fptarget"), strength.map(lambda v: f"fptarget={v}"))))
        elif k == "store":
            items.append(draw(st.sampled_from(["store=bf16", "store=fp16"])))
        elif k == "kvgroup":
            items.append(f"kvgroup={draw(st.sampled_from([8, 16, 32, 64, 128]))}")
        elif k == "sinks":
            items.append(f"sinks={draw(st.integers(0, 16))}")
        else:
            items.append(k)
    fits = any(i.startswith(("smooth", "learn", "aclip=search")) for i in items)
    if fits and "seq" not in keys and draw(st.booleans()):
        items.append("seq")  # true-sequential inputs for options fitted per linear: RTN too
    items = draw(st.permutations(items))
    text = f"{name}:{rot}:{method}"
    return text + ":" + ",".join(items) if items or draw(st.booleans()) else text


@settings(max_examples=300, deadline=None)
@given(recipe_strings())
def test_random_option_sets_round_trip(text):
    r = _check(text)
    # the canonical spelling parses to the recipe whatever the order the options were written in
    name, rot, method, *opts = text.split(":")
    if opts and opts[0]:
        shuffled = ",".join(reversed(opts[0].split(",")))
        assert get_recipe(f"{name}:{rot}:{method}:{shuffled}") == r


@settings(max_examples=200, deadline=None)
@given(recipe_strings(), recipe_strings())
def test_spec_is_injective(a, b):
    ra, rb = get_recipe(a), get_recipe(b)
    assert (ra.spec() == rb.spec()) == (ra == rb), (a, b)


# ---------------------------------------------------------------------------------------------------------------
# No string form: spec() names the field, str() still works, JSON is lossless
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,field", [
    (dict(name="custom"), "name"),
    (dict(weight="int4"), "weight"),
    (dict(act=None), "act"),
    (dict(kv="int8"), "kv"),
    (dict(calib_windows=8), "calib_windows"),
    (dict(calib_len=128), "calib_len"),
    (dict(calib_rows=64), "calib_rows"),
    (dict(kv_rotation=False), "kv_rotation"),
    (dict(ignore=("lm_head",)), "ignore"),
    (dict(targets=("re:.*mlp",)), "targets"),
    (dict(gptq=GPTQConfig(damp=0.1)), "gptq.damp"),
    (dict(gptq=GPTQConfig(block_size=128)), "gptq.block_size"),
    (dict(rotation=RotationConfig("random", seed=7)), "rotation.seed"),
    (dict(rotation=RotationConfig("random", fallback=None)), "rotation.fallback"),
    (dict(rotation=RotationConfig("block", 7)), "rotation.block_size"),
])
def test_spec_refuses_what_no_string_expresses(change, field):
    r = dataclasses.replace(get_recipe("w4a4:random:gptq:wclip"), **change)
    with pytest.raises(ValueError) as info:
        r.spec()
    msg = str(info.value)
    assert f"{field}=" in msg and "no string form" in msg and "JSON" in msg and "\n" not in msg, msg
    assert str(r) == repr(r)  # str() never raises
    assert _json(r) == r  # the lossless form


def test_spec_refuses_a_kv_scheme_other_than_the_presets():
    r = get_recipe("kv4")
    with pytest.raises(ValueError, match=r"kv=.*no string form"):
        dataclasses.replace(r, kv=dict(r.kv, symmetric=True)).spec()


# ---------------------------------------------------------------------------------------------------------------
# JSON form
# ---------------------------------------------------------------------------------------------------------------


def test_json_round_trip_and_defaults(tmp_path):
    r = get_recipe("w4a4kv4:block-64:gptq:smooth=0.5,aclip=search,wclip,actorder,refit=3,fptarget=0.25,store=fp16,"
                   "learn=orthogonal,steps=7,kvgroup=32,kvclip,kvcenter,sinks=2")
    assert _json(r) == r
    custom = dataclasses.replace(r, name="mine", ignore=(), targets=("layers.*",), calib_windows=4, gptq=GPTQConfig(damp=0.05, refit=3,
                                 act_order=True), rotation=RotationConfig("block", 12, seed=3, fallback=None))
    assert _json(custom) == custom
    custom.save(tmp_path / "r.json")
    assert QuantRecipe.load(tmp_path / "r.json") == custom
    assert get_recipe(str(tmp_path / "r.json")) == custom
    # a missing key takes the field's default (skip included)
    assert QuantRecipe.from_dict({}) == QuantRecipe()
    assert QuantRecipe.from_dict({"weight": "int4", "gptq": {}, "rotation": {"kind": "random"}}) == \
        QuantRecipe(weight="int4", rotation=RotationConfig("random"))
    assert QuantRecipe.from_dict({"ignore": []}).ignore == ()
    # a recipe.json written before targets/ignore names the ignore list "skip"
    assert QuantRecipe.from_dict({"skip": ["lm_head"]}).ignore == ("lm_head",)
    with pytest.raises(ValueError, match="both 'skip'"):
        QuantRecipe.from_dict({"skip": [], "ignore": []})


GOOD = get_recipe("w4a16_g128:hadamard:gptq").to_dict()


def _with(**changes):
    d = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if "__" in k:
            sub, key = k.split("__")
            d[sub][key] = v
        else:
            d[k] = v
    return d


BAD_JSON = [
    (_with(bogus=1), ["bogus", "known", "calib_windows"]),
    (_with(gptq__bogus=1), ["gptq", "bogus", "damp", "refit"]),
    (_with(rotation__bogus=1), ["rotation", "bogus", "kind", "block_size"]),
    (_with(calib_windows="32"), ["calib_windows", "'32'", "whole number"]),
    (_with(calib_len=0), ["calib_len", ">= 1"]),
    (_with(calib_rows=1.5), ["calib_rows", "whole number"]),
    (_with(ignore="lm_head"), ["ignore", "'lm_head'", "list"]),
    (_with(ignore=["lm_head", 3]), ["ignore", "list"]),
    (_with(targets=["re:("]), ["targets", "regular expression"]),
    (_with(gptq="gptq"), ["gptq", "object", "damp"]),
    (_with(rotation="random"), ["rotation", "object", "kind"]),
    (_with(rotation__kind="walsh"), ["rotation", "walsh", "hadamard", "block"]),
    (_with(rotation__kind="block"), ["block", "block_size"]),
    (_with(rotation__block_size=128), ["block_size", "'block'", "hadamard"]),
    (_with(rotation__seed="0"), ["seed", "whole number"]),
    (_with(rotation__fallback="qr"), ["fallback", "qr", "dct", "random"]),
    (_with(gptq__refit="2"), ["gptq.refit", "whole number"]),
    (_with(gptq__refit=-1), ["gptq.refit", ">= 0"]),
    (_with(gptq__act_order="yes"), ["gptq.act_order", "true or false"]),
    (_with(gptq__damp=-0.1), ["gptq.damp", ">= 0"]),
    (_with(gptq__block_size=0), ["gptq.block_size", ">= 1"]),
    (_with(method="awq"), ["method", "awq", "rtn", "gptq"]),
    (_with(smooth="high"), ["smooth", "search", "[0, 1]"]),
    (_with(act_clip=True), ["act_clip", "search"]),
    (_with(fp_target="0.5"), ["fp_target", "[0, 1]"]),
    (_with(sequential=1), ["sequential", "true or false"]),
    (_with(weight_clip="true"), ["weight_clip", "true or false"]),
    (_with(kv_rotation=None), ["kv_rotation", "true or false"]),
    (_with(learned="spin"), ["learned", "spin", "orthogonal", "affine"]),
    (_with(store_dtype="fp8"), ["store_dtype", "fp8", "bf16", "fp16"]),
    (_with(weight="int5"), ["weight", "int5", "presets"]),
    (_with(weight=4), ["weight", "int"]),
    (_with(name=None), ["name", "string"]),
    (_with(learn_steps=0), ["learn_steps", ">= 1"]),
    (_with(kv_sink_tokens=-1), ["kv_sink_tokens", ">= 0"]),
    # conflicting settings
    (_with(method="rtn", gptq__refit=2), ["gptq.refit", "refit", "gptq", "rtn"]),
    (_with(method="rtn", gptq__act_order=True), ["gptq.act_order", "actorder", "gptq", "rtn"]),
    (_with(method="rtn", sequential=True), ["sequential", "seq", "gptq", "rtn"]),
    (_with(fp_target=0.5), ["fptarget", "sequential=True"]),
    (_with(method="rtn", fp_target=0.5, sequential=True), ["fp_target", "fptarget", "gptq", "rtn"]),
    (_with(weight=None, sequential=True), ["sequential", "quantizes no weights"]),
    (_with(weight=None, weight_clip=True), ["weight_clip", "wclip", "quantizes no weights"]),
    (_with(kv_center=True), ["kv_center", "kvcenter", "no KV quantization"]),
    (_with(kv_sink_tokens=4), ["kv_sink_tokens", "sinks", "no KV quantization"]),
    (_with(learn_steps=5), ["learn_steps", "steps", "learn"]),
    (_with(fuse_values=True, rotation__kind="none"), ["fusevo", "hadamard", "random"]),
    (_with(weight=None, smooth="search"), ["smooth", "quantized weights or activations"]),
]


@pytest.mark.parametrize("d,words", BAD_JSON, ids=[",".join(w[:2]) for _, w in BAD_JSON])
def test_bad_json_is_refused_by_name(d, words, tmp_path):
    for load in (QuantRecipe.from_dict, lambda x: _load(tmp_path, x)):
        with pytest.raises(ValueError) as info:
            load(d)
        msg = str(info.value)
        assert "\n" not in msg, msg
        for w in words:
            assert w in msg, (w, msg)


def _load(tmp_path, d):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    return QuantRecipe.load(p)


def test_json_must_be_an_object():
    for d in ([], "w4a4", None, 3):
        with pytest.raises(ValueError, match="JSON object"):
            QuantRecipe.from_dict(d)


# ---------------------------------------------------------------------------------------------------------------
# One set of rules: strings, JSON and direct construction get the same error
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,fields", [
    ("w4a16:hadamard:rtn:refit=3", dict(name="w4a16", weight="int4", rotation=RotationConfig("hadamard"),
                                        gptq=GPTQConfig(refit=3))),
    ("w4a16:hadamard:rtn:actorder", dict(name="w4a16", weight="int4", rotation=RotationConfig("hadamard"),
                                         gptq=GPTQConfig(act_order=True))),
    ("w4a16:hadamard:rtn:seq", dict(name="w4a16", weight="int4", rotation=RotationConfig("hadamard"),
                                    sequential=True)),
    ("w4a16:hadamard:rtn:fptarget", dict(name="w4a16", weight="int4", rotation=RotationConfig("hadamard"),
                                         fp_target=0.5, sequential=True)),
    ("kv4:none:gptq:seq", dict(name="kv4", kv=get_recipe("kv4").kv, method="gptq", sequential=True)),
    ("kv4:none:rtn:wclip", dict(name="kv4", kv=get_recipe("kv4").kv, weight_clip=True)),
    ("w4a4:none:rtn:kvcenter", dict(name="w4a4", weight="int4_g128", act="int4", kv_center=True)),
    ("w4a4:none:rtn:fusevo", dict(name="w4a4", weight="int4_g128", act="int4", fuse_values=True)),
    ("w4a4:random:rtn:steps=5", dict(name="w4a4", weight="int4_g128", act="int4", rotation=RotationConfig("random"),
                                     learn_steps=5)),
    ("kv4:none:rtn:smooth=search", dict(name="kv4", kv=get_recipe("kv4").kv, smooth="search")),
    ("w4a16:none:rtn:store=fp8", dict(name="w4a16", weight="int4", store_dtype="fp8")),
])
def test_strings_json_and_construction_share_errors(text, fields):
    errors = []
    for make in (lambda: get_recipe(text), lambda: QuantRecipe(**fields),
                 lambda: QuantRecipe.from_dict(json.loads(json.dumps(dict(
                     fields, **{k: dataclasses.asdict(v) for k, v in fields.items()
                                if dataclasses.is_dataclass(v)}))))):
        with pytest.raises(ValueError) as info:
            make()
        errors.append(str(info.value))
    if "steps" in text:  # the string answers first with the option's own wording (steps=40 is refused too)
        assert "steps" in errors[0] and "learn" in errors[0]
        errors = errors[1:]
    assert len(set(errors)) == 1, errors


def test_with_options_moves_between_rotation_kinds():
    r = get_recipe("w4a16:block-64:gptq")
    assert r.with_options(rotation="hadamard").rotation == RotationConfig("hadamard")
    assert r.with_options(rotation="random", seed=3).rotation == RotationConfig("random", seed=3)
    assert get_recipe("w4a16:hadamard").with_options(rotation="block", block_size=32).rotation == \
        RotationConfig("block", 32)
    with pytest.raises(ValueError, match="block_size"):
        get_recipe("w4a16:hadamard").with_options(block_size=32)


# ---------------------------------------------------------------------------------------------------------------
# E8P lattice recipes (hadakit.quantization.quip)
# ---------------------------------------------------------------------------------------------------------------


def test_e8p_recipes_round_trip():
    from hadakit.quantization.recipes import list_vector_recipes

    assert list_vector_recipes() == ["e8p2", "e8p3", "e8p4"]
    assert not set(list_vector_recipes()) & set(list_recipes())          # the scalar preset list is unchanged
    for bits in (2, 3, 4):
        name = f"e8p{bits}"
        r = _check(name)
        assert r == QuantRecipe(name=name, vector_bits=bits, rotation=RotationConfig("random"), method="gptq")
        assert r.spec() == f"{name}:random:gptq" and r.weight is None and r.needs_calibration
        for rot in ("random", "none"):
            for method in METHODS:
                s = f"{name}:{rot}:{method}"
                assert _check(s).spec() == s
                t = f"{s}:scalesearch"
                assert _check(t).spec() == t and _check(t).vector_scale_search
        assert not _check(f"{name}:none:rtn").needs_calibration
        assert _check(f"{name}::").spec() == f"{name}:random:gptq"
    specs = {get_recipe(f"e8p{b}:{r}:{m}").spec() for b in (2, 3, 4) for r in ("random", "none") for m in METHODS}
    assert len(specs) == 3 * 2 * len(METHODS)


@pytest.mark.parametrize("text,match", [
    ("e8p2:hadamard", "rotation 'random'"),
    ("e8p3:block-32:gptq", "rotation 'random'"),
    ("e8p2:random:gptq:wclip", "not supported by the e8p recipes"),
    ("e8p4:random:gptq:seq", "not supported by the e8p recipes"),
    ("e8p2:random:gptq:store=bf16", "not supported by the e8p recipes"),
    ("w4a16_g128:none:gptq:scalesearch", "needs an e8p recipe"),
    ("e8p2:random:gptq:scalesearch=1", "takes no value"),
    ("e8p5", "unknown recipe"),
])
def test_e8p_bad_strings(text, match):
    with pytest.raises(ValueError, match=match):
        get_recipe(text)


def test_e8p_bad_json_and_construction():
    with pytest.raises(ValueError, match="vector_bits must be one of"):
        QuantRecipe(name="e8p2", vector_bits=5, rotation=RotationConfig("random"), method="gptq")
    with pytest.raises(ValueError, match="vector_bits must be one of"):
        QuantRecipe.from_dict(dict(name="e8p2", vector_bits=True))
    with pytest.raises(ValueError, match="replace the weight scheme"):
        QuantRecipe(name="x", weight="int4", vector_bits=2)
    r = QuantRecipe(name="e8p2", vector_bits=2, rotation=RotationConfig("random", seed=3), method="gptq")
    assert _json(r) == r
    with pytest.raises(ValueError, match="rotation.seed"):
        r.spec()
    # a recipe.json written before vector_bits existed loads to the same scalar recipe
    old = get_recipe("w4a16_g128:random:gptq").to_dict()
    del old["vector_bits"], old["vector_scale_search"]
    assert QuantRecipe.from_dict(old) == get_recipe("w4a16_g128:random:gptq")


def test_e8p_recipes_refused_by_callers_that_do_not_route_them():
    from conftest import tiny_llama

    from hadakit.quantization.recipes import check_recipe_for_model

    model = tiny_llama(vocab=64)
    with pytest.raises(ValueError, match="quantize_model_recipe"):
        check_recipe_for_model(get_recipe("e8p2"), model)
    check_recipe_for_model(get_recipe("e8p2"), model, vector_routed=True)
    check_recipe_for_model(get_recipe("w4a16:hadamard"), model)            # scalar recipes: as before
