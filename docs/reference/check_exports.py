"""mkdocs hook: fail the build when a public name is missing from the API reference.

The reference pages name their objects one by one (so that private helpers, type aliases
and TypeVars stay out); this hook keeps them complete. After the build it reads, with
griffe (statically, as mkdocstrings does), every name in ``__all__`` of ``propagate`` and
of each public submodule (all public names where a module has no ``__all__``), and warns,
which ``mkdocs build --strict`` turns into an error, for each one that no page of the
site documents under its dotted path. The pytest plugin's ``pytest_*`` hooks are not API.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.check_exports")

PACKAGE = "propagate"


def _public_names(module: Any) -> list[str]:
    names = [str(n) for n in module.exports] if module.exports is not None else [
        name for name, member in module.members.items() if member.is_public]
    if module.path == f"{PACKAGE}.pytest_plugin":
        names = [name for name in names if not name.startswith("pytest_")]
    return names


def on_post_build(config: Any) -> None:
    root = Path(config.config_file_path).parent
    package = griffe.load(PACKAGE, search_paths=[str(root)], resolve_aliases=False)
    modules = [package] + [member for member in package.modules.values() if member.is_public]
    ids: set[str] = set()
    for page in Path(config.site_dir).rglob("*.html"):
        ids.update(re.findall(r'\bid="([^"]+)"', page.read_text(encoding="utf-8")))
    for module in modules:
        if module.path not in ids:
            log.warning("API reference: module %s is documented on no page", module.path)
        for name in _public_names(module):
            if f"{module.path}.{name}" not in ids:
                log.warning("API reference: %s.%s (public) is documented on no page; "
                            "add it to a page under docs/reference/", module.path, name)
