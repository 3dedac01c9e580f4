"""One rotation grammar (hadakit.transforms.spec) for quantize recipes and inspect: the same name parses to the
same rotation in both, and builds the same matrix for the same layer."""

import pytest
import torch

from hadakit.analysis.stats import make_rotation as inspect_rotation
from hadakit.analysis.stats import parse_rotation as inspect_parse
from hadakit.quantization import get_recipe
from hadakit.quantization.pipeline import make_rotation as quantize_rotation
from hadakit.quantization.recipes import RotationConfig
from hadakit.transforms.spec import RotationSpec, layer_seed, parse_rotation

NAMES = ["none", "hadamard", "random", "block-32", "block-128", "random-block-32", "random-block-640"]


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_everywhere(name):
    spec = parse_rotation(name)
    assert (spec is None) == (name == "none")
    if spec is not None:
        assert str(spec) == name and parse_rotation(str(spec)) == spec
        assert inspect_parse(name) == (spec.block_size, spec.signs)
    else:
        assert inspect_parse(name) is None
    rot = RotationConfig.from_name(name)
    assert rot.label() == name
    recipe = get_recipe(f"w4a4:{name}:rtn")
    assert recipe.rotation == rot and get_recipe(str(recipe)) == recipe


@pytest.mark.parametrize("name", ["random", "random-block-32", "block-32", "hadamard"])
def test_quantize_and_inspect_build_the_same_matrix(name):
    n, layer = 1280, "model.layers.3.mlp.down_proj"
    recipe = get_recipe(f"w4a4:{name}:rtn")
    q = quantize_rotation(recipe, layer, n)
    a = inspect_rotation(name, n, seed=layer_seed(recipe.rotation.seed, layer))
    eye = torch.eye(n)
    assert torch.equal(q(eye), a(eye))
    # negative control: another layer's seed gives another matrix for the random kinds
    b = inspect_rotation(name, n, seed=layer_seed(recipe.rotation.seed, layer + "x"))
    assert torch.equal(q(eye), b(eye)) == (not name.startswith("random"))


@pytest.mark.parametrize("bad, words", [("blocks-32", "valid rotations"), ("block-", "whole number"),
                                        ("block-3x", "whole number"), ("random-block-0", "positive"),
                                        ("rand", "valid rotations")])
def test_bad_names(bad, words):
    with pytest.raises(ValueError, match=words):
        parse_rotation(bad)
    with pytest.raises(ValueError):
        get_recipe(f"w4a4:{bad}:rtn")


def test_spec_validates():
    with pytest.raises(ValueError, match="signs"):
        RotationSpec(32, "per_call")
    with pytest.raises(ValueError, match="positive"):
        RotationSpec(0)


@pytest.mark.parametrize("name, rotation, signs", [("hadamard", "full", "none"), ("random", "full", "fixed"),
                                                   ("block-32", 32, "none"), ("random-block-64", 64, "fixed")])
def test_training_products_read_the_same_names(name, rotation, signs):
    from hadakit.training import ProductConfig

    prod = ProductConfig("int4", "int4", rotation=name)
    assert (prod.rotation, prod.signs) == (rotation, signs)
    assert prod == ProductConfig("int4", "int4", rotation=rotation, signs=signs)
    with pytest.raises(ValueError, match="valid rotations"):
        ProductConfig("int4", "int4", rotation="blocks-32")
