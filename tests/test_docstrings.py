"""The examples in the public docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "hadakit",
    "hadakit.transforms.functional",
    "hadakit.transforms.rotations",
    "hadakit.formats",
    "hadakit.formats.fused",
    "hadakit.training",
    "hadakit.analysis",
    "hadakit.analysis.stats",
    "hadakit.selection",
    "hadakit.transforms.spec",
    "hadakit.transforms.sparse",
    "hadakit.quantization",
    "hadakit.io.synthetic",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0
