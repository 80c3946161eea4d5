"""The static import scan the layering and process-boundary contracts share: one reading of what
a module imports, so that a form of import one contract sees (inside a function, relative,
through ``importlib``) is never invisible to the other."""

from __future__ import annotations

import ast
from pathlib import Path


def imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, at any depth (inside
    functions too), relative imports resolved, plus literal ``import_module``/``__import__``.
    ``module_level_only``: only the import statements of the module's own body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    if module_level_only:
        tree = ast.Module(
            body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)],
            type_ignores=[],
        )
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(path, node.module or "", node.level)
            found.add(module)
            # ``from ferry import server`` names the module through its alias.
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and _call_name(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def under(name: str, prefix: str) -> bool:
    """``name`` is the module ``prefix`` or one inside it."""
    return name == prefix or name.startswith(prefix + ".")


def matching(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """The names under any of ``prefixes``, sorted (an assertion's readable list)."""
    return sorted(name for name in names if any(under(name, p) for p in prefixes))


def _absolute(path: Path, module: str, level: int) -> str:
    """``from ..x import y`` in ``path`` -> the absolute name of ``..x``."""
    if level == 0:
        return module
    parts = list(path.relative_to(_package_root(path)).with_suffix("").parts)
    base = parts[: len(parts) - level]
    return ".".join([*base, module] if module else base)


def _package_root(path: Path) -> Path:
    """The folder that holds the top-level package ``path`` belongs to."""
    folder = path.parent
    while (folder / "__init__.py").exists() or folder.name == "ferry":
        folder = folder.parent
    return folder


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""
