"""Every runnable docstring example in the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import influencekit
import influencekit.store
import influencekit.widgets

# The subpackages live in their own folders (store/, widgets/): walk each one.
PACKAGES = (influencekit, influencekit.store, influencekit.widgets)
MODULES = sorted(
    info.name
    for package in PACKAGES
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
)


@pytest.mark.parametrize("name", [p.__name__ for p in PACKAGES] + MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    outcome = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert outcome.failed == 0, f"{outcome.failed} docstring example(s) failed in {name}"


def test_the_version_is_the_one_in_pyproject():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == influencekit.__version__
