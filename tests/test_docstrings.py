"""The tests read as the specification: each opens its docstring with what it checks.

A test's docstring begins with the labels of the invariants it checks, comma-separated,
then a colon: ``I1, I4: ...``. The labels are those docs/design.md defines under "Invariants
and where they are tested": ``API`` (the public surface, and the drop-ins' stdlib
behaviour) and I1 to I9. ``grep -rn "I6" tests`` then finds the relay's tests.

This module checks the suite, not propagate: its own tests are the one exception.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
DESIGN = TESTS.parent / "docs" / "design.md"
SECTION = "## Invariants and where they are tested"
MODULES = sorted(p.name for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)


def defined_labels() -> set[str]:
    """The labels docs/design.md defines: ``* **I1** ...`` under the invariants heading."""
    text = DESIGN.read_text(encoding="utf-8")
    assert SECTION in text, f"{DESIGN} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    labels = set(re.findall(r"^\* \*\*([A-Za-z][A-Za-z0-9]*)\*\*", section, re.MULTILINE))
    assert labels, f"no labels found under {SECTION!r} in {DESIGN}"
    return labels


def docstrings_of_tests(source: str) -> list[tuple[str, str | None]]:
    """Each test function (module level, or a method of a ``Test`` class) and its docstring."""
    found: list[tuple[str, str | None]] = []
    tree = ast.parse(source)
    scopes = [tree.body] + [node.body for node in tree.body
                            if isinstance(node, ast.ClassDef) and node.name.startswith("Test")]
    for body in scopes:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.name.startswith("test"):
                found.append((node.name, ast.get_docstring(node)))
    return found


def unlabelled(module: str, known: set[str]) -> list[str]:
    """The tests of ``module`` whose docstring does not open with known labels and a colon."""
    label = "|".join(sorted(map(re.escape, known)))
    opening = re.compile(rf"(?:{label})(?:, (?:{label}))*: ")
    return [name for name, doc in docstrings_of_tests((TESTS / module).read_text(encoding="utf-8"))
            if doc is None or not opening.match(doc)]


@pytest.mark.parametrize("module", MODULES)
def test_every_test_opens_with_the_invariants_it_checks(module: str) -> None:
    """Each test's docstring opens with labels docs/design.md defines, then ': '."""
    known = defined_labels()
    missing = unlabelled(module, known)
    assert not missing, (
        f"{module}: give these tests a docstring opening with one or more of "
        f"{sorted(known)}, comma-separated, then ': ': {missing}")


def test_the_invariants_are_defined_and_each_has_tests() -> None:
    """docs/design.md defines API and I1 to I9, and each is named by at least one test."""
    defined = defined_labels()
    assert {"API"} | {f"I{i}" for i in range(1, 10)} <= defined, sorted(defined)
    named: set[str] = set()
    for module in MODULES:
        for _, doc in docstrings_of_tests((TESTS / module).read_text(encoding="utf-8")):
            opening = (doc or "").split(": ", 1)[0]
            named.update(label.strip() for label in opening.split(","))
    assert defined <= named, sorted(defined - named)
