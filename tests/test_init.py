"""propagate/__init__.py: the table of contents, ``__all__`` and the public names agree."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import types
from typing import Any

import pytest

import propagate

# The public API of DESIGN.md: these names are a contract.
TOP_LEVEL = [
    "ThreadPoolExecutor", "ProcessPoolExecutor", "wrap_executor",
    "Thread", "Timer", "wrap",
    "capture", "DetachedContext", "register",
    "to_thread", "run_in_executor", "install",
    "span", "trace",
]
MEMBERS = {
    "DetachedContext": ["attach", "to_carrier", "from_carrier"],
}
SUBMODULES = {
    "propagate.dns": ["Resolver", "getaddrinfo", "resolve"],
    "propagate.debug": [],
    "propagate.__main__": [],  # python -m propagate demo | doctor
}


def public_names(module: types.ModuleType) -> set[str]:
    """Attributes that are neither private nor submodules."""
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)}


def test_all_names_exist():
    """API: every name in __all__ is an attribute of the package, listed once."""
    missing = [name for name in propagate.__all__ if not hasattr(propagate, name)]
    assert missing == []
    assert len(propagate.__all__) == len(set(propagate.__all__))


def test_every_public_attribute_is_in_all():
    """API: every public attribute of the package (submodules aside) is listed in __all__."""
    assert public_names(propagate) - set(propagate.__all__) == set()


def test_star_import_gives_all():
    """API: ``from propagate import *`` gives exactly the names of __all__."""
    namespace: dict[str, Any] = {}
    exec("from propagate import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(propagate.__all__)


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_design_names_exist(name):
    """API: each top-level name of DESIGN.md's public API is exported."""
    assert name in propagate.__all__
    assert getattr(propagate, name) is not None


@pytest.mark.parametrize("owner", sorted(MEMBERS))
def test_design_members_exist(owner):
    """API: the methods DESIGN.md names on public classes exist and are callable."""
    cls = getattr(propagate, owner)
    assert [m for m in MEMBERS[owner] if not callable(getattr(cls, m, None))] == []


@pytest.mark.parametrize("module_name", sorted(SUBMODULES))
def test_design_submodules_exist(module_name):
    """API: the public submodules of DESIGN.md import and hold their named functions."""
    assert importlib.util.find_spec(module_name) is not None, module_name
    if module_name == "propagate.__main__":
        return  # importing it would run the command line
    module = importlib.import_module(module_name)
    assert [n for n in SUBMODULES[module_name] if not hasattr(module, n)] == []


def test_errors_are_exceptions():
    """API: the exported errors derive from PropagateError and the warning from Warning."""
    for name in ("ContextSerializationError", "TaskSerializationError"):
        assert issubclass(getattr(propagate, name), propagate.PropagateError)
    assert issubclass(propagate.PropagateError, Exception)
    assert issubclass(propagate.CrossThreadExitWarning, Warning)


def test_version():
    """API: the package has a version string."""
    assert isinstance(propagate.__version__, str)
    assert propagate.__version__


@pytest.mark.parametrize("name", sorted(propagate.__all__))
def test_public_names_have_docstrings(name):
    """API: every public function and class has a docstring."""
    assert (inspect.getdoc(getattr(propagate, name)) or "").strip(), name


def own_public_members(cls: type) -> list[str]:
    """Public methods and properties a propagate class defines itself."""
    return [name for name, value in vars(cls).items()
            if not name.startswith("_")
            and (callable(value) or isinstance(value, (property, classmethod, staticmethod)))]


@pytest.mark.parametrize("name", sorted(n for n in propagate.__all__
                                        if inspect.isclass(getattr(propagate, n))))
def test_public_members_have_docstrings(name):
    """API: every public method and property of a public class has a docstring."""
    cls = getattr(propagate, name)
    undocumented = [member for member in own_public_members(cls)
                    if not (inspect.getdoc(getattr(cls, member)) or "").strip()
                    and not (inspect.getdoc(vars(cls)[member]) or "").strip()]
    assert undocumented == []


def test_wrapper_docstrings_say_like():
    """STYLE: the docstrings of the drop-in wrappers open with "Like `X`, but ..."."""
    wrappers = ["ThreadPoolExecutor", "ProcessPoolExecutor", "Thread", "Timer", "wrap",
                "wrap_executor", "span"]
    unlike = [name for name in wrappers
              if not (inspect.getdoc(getattr(propagate, name)) or "").startswith("Like ")]
    assert unlike == []
