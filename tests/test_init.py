"""propagate/__init__.py: the table of contents, ``__all__`` and the public names agree."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import types
from typing import Any

import pytest

import propagate

# The public API of docs/design.md ("The public API"): these names are a contract.
TOP_LEVEL = [
    "ThreadPoolExecutor", "ProcessPoolExecutor", "wrap_executor",
    "Thread", "Timer", "wrap",
    "capture", "DetachedContext", "register",
    "to_thread", "run_in_executor", "install",
    "span", "trace",
    "instrument", "uninstrument",
]
MEMBERS = {
    "DetachedContext": ["attach", "to_carrier", "from_carrier"],
}
SUBMODULES = {
    "propagate.dns": ["Resolver", "getaddrinfo", "resolve", "AiohttpResolver", "LookupTimeout"],
    "propagate.dask": ["executor"],
    "propagate.ray": ["executor"],
    "propagate.joblib": ["register"],
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
    """API: each top-level name of the public API (docs/design.md) is exported."""
    assert name in propagate.__all__
    assert getattr(propagate, name) is not None


@pytest.mark.parametrize("owner", sorted(MEMBERS))
def test_design_members_exist(owner):
    """API: the methods docs/design.md names on public classes exist and are callable."""
    cls = getattr(propagate, owner)
    assert [m for m in MEMBERS[owner] if not callable(getattr(cls, m, None))] == []


@pytest.mark.parametrize("module_name", sorted(SUBMODULES))
def test_design_submodules_exist(module_name):
    """API: the public submodules docs/design.md names import and hold their named functions."""
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
    """API: the docstrings of the drop-in wrappers open with "Like `X`, but ..."."""
    wrappers = ["ThreadPoolExecutor", "ProcessPoolExecutor", "Thread", "Timer", "wrap",
                "wrap_executor", "span"]
    unlike = [name for name in wrappers
              if not (inspect.getdoc(getattr(propagate, name)) or "").startswith("Like ")]
    assert unlike == []


# What `import propagate` loads: nothing until a name is used, then what that name needs
CORE = {
    "propagate", "propagate._context", "propagate._errors", "propagate._executor",
    "propagate._heal", "propagate._otel", "propagate._private", "propagate._span",
    "propagate._switch", "propagate._thread", "propagate._version", "propagate._wire",
}
NOT_UNTIL_USED = ["asyncio", "socket", "ssl", "selectors", "multiprocessing", "subprocess",
                  "cloudpickle", "concurrent.futures.process", "concurrent.interpreters",
                  "opentelemetry.propagate", "opentelemetry.sdk"]


def modules_after(code: str) -> set[str]:
    """The modules loaded in a fresh interpreter after running ``code``, with OpenTelemetry's
    default runtime context (OTEL_PYTHON_CONTEXT=propagate loads propagate._runtime)."""
    env = {k: v for k, v in os.environ.items() if k != "OTEL_PYTHON_CONTEXT"}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True, env=env)
    return set(json.loads(out.stdout.splitlines()[-1]))


def heavy(loaded: set[str]) -> list[str]:
    return [m for m in NOT_UNTIL_USED if any(x == m or x.startswith(m + ".") for x in loaded)]


@pytest.mark.parametrize("code", ["import propagate", "import propagate.pytest_plugin"])
def test_import_loads_nothing_until_a_name_is_used(code):
    """API: ``import propagate``, and the pytest plugin every pytest run here loads, load
    neither OpenTelemetry nor any of propagate's modules but the errors and the version."""
    loaded = modules_after(code)
    assert {m for m in loaded if m.split(".")[0] == "propagate"} - {
        "propagate.pytest_plugin"} == {"propagate", "propagate._errors", "propagate._version"}
    assert [m for m in loaded if m.split(".")[0] == "opentelemetry"] == []
    assert heavy(loaded - modules_after("import pytest" if "plugin" in code else "")) == []


def test_the_core_loads_only_the_core():
    """API: using a thread pool loads the core, and none of asyncio, sockets,
    multiprocessing, cloudpickle, OpenTelemetry's propagators or SDK, debug or dns."""
    loaded = modules_after("import propagate\npropagate.ThreadPoolExecutor(1).shutdown()")
    assert {m for m in loaded if m.split(".")[0] == "propagate"} == CORE
    otel = modules_after("import opentelemetry.trace, opentelemetry.context, opentelemetry.baggage")
    assert heavy(loaded - otel) == []  # (on 3.10 the API's own uuid import loads subprocess)


@pytest.mark.parametrize("name", sorted(propagate._LAZY))
def test_each_name_is_what_its_module_defines(name):
    """API: a name imported on first use is the object its module defines, and loads it."""
    where = propagate._LAZY[name]
    module = f"propagate.{name}" if where is None else f"propagate{where}"
    assert module in modules_after(f"import propagate\nassert propagate.{name} is not None")
    found = importlib.import_module(module)
    assert getattr(propagate, name) is (found if where is None else getattr(found, name))


def public_callables() -> list[tuple[str, Any]]:
    """Every public function and method of the API, and of its public submodules."""
    found: list[tuple[str, Any]] = []

    def add(prefix: str, obj: Any) -> None:
        if inspect.isclass(obj):
            found.extend((f"{prefix}.{name}", member) for name, member in vars(obj).items()
                         if inspect.isfunction(member) and (
                             not name.startswith("_") or name.endswith("__")))
        elif callable(obj):
            found.append((prefix, obj))

    for name in propagate.__all__:
        obj = getattr(propagate, name)
        if inspect.ismodule(obj):
            for inner in getattr(obj, "__all__", []):
                add(f"{name}.{inner}", getattr(obj, inner))
        else:
            add(name, obj)
    return found


CALLABLES = public_callables()


@pytest.mark.parametrize("obj", [obj for _, obj in CALLABLES], ids=[n for n, _ in CALLABLES])
def test_type_hints_resolve_at_run_time(obj):
    """API: every public signature's annotations resolve at run time (typing.get_type_hints),
    as they do for a type checker: no name exists only under TYPE_CHECKING."""
    import typing

    typing.get_type_hints(obj)
