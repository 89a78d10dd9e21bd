"""Every runnable docstring example in the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import influencekit

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(influencekit.__path__, prefix="influencekit.")
)


@pytest.mark.parametrize("name", ["influencekit", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    outcome = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert outcome.failed == 0, f"{outcome.failed} docstring example(s) failed in {name}"
