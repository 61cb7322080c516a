"""The `__all__` trap of group data files, made an error.

pyinfra 3.10 reads `group_data/<group>.py` by executing it and keeping its names; when the
file sets `__all__`, only the names listed there become group data, and every other one is
dropped without a word (pyinfra_cli/inventory.py, `_get_group_data`). A setting written in
such a file but not listed is then silently not applied. `__all__` is still useful (it keeps
helpers such as `_state` out of host data, which pyinfra would otherwise include), so it stays
allowed, and a public name it leaves out is an error naming the file and the name.

The check reads the files without running them (their top-level assignments, by `ast`), so it
is cheap and has no side effects; `settings()` runs it once per deploy on the group data
directories pyinfra itself reads (the current directory's and the inventory's `group_data/`
and every `--group-data`), and tests/deploy_parts/test_group_data.py on every file of the
repository.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path


def _assigned(body: list[ast.stmt]) -> list[str]:
    """Names bound by top-level assignments (also inside top-level if/try blocks)."""
    names: list[str] = []
    for node in body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        elif isinstance(node, ast.If | ast.Try):
            names += _assigned(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                names += _assigned(handler.body)
    return names


def problems(path: Path) -> list[str]:
    """What pyinfra would silently drop from group data file `path` (empty: nothing)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = _assigned(tree.body)
    exports = None
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and "__all__" in _assigned([node]):
            try:
                exports = ast.literal_eval(node.value) if node.value is not None else None
            except ValueError:
                return [f"{path}: __all__ is computed; write it as a literal list of the names to export"]
    if exports is None:
        return []  # pyinfra exports every name the file assigns
    found = []
    for name in dict.fromkeys(names):
        if not name.startswith("_") and name not in exports:
            found.append(
                f"{path}: '{name}' is not in __all__, so pyinfra drops it silently; "
                f"add it to __all__ (or name it _{name} if it is a helper)"
            )
    for name in exports:
        if name not in names:
            found.append(f"{path}: __all__ lists '{name}', which the file does not set; remove it or set it")
    return found


def files(directories: Iterable[Path]) -> list[Path]:
    """The group data files pyinfra would read from `directories` (a directory or a file each)."""
    found: list[Path] = []
    for directory in directories:
        if directory.is_file() and directory.suffix == ".py":
            found.append(directory)
        elif directory.is_dir():
            found += sorted(p for p in directory.iterdir() if p.suffix == ".py" and p.is_file())
    return list(dict.fromkeys(found))


def directories(inventory: str | None, cwd: str, extra: Iterable[str] = ()) -> list[Path]:
    """Where pyinfra looks for group data: `<cwd>/group_data`, `<inventory's dir>/group_data`,
    then each `--group-data` path (pyinfra_cli/inventory.py, make_inventory_from_files)."""
    found = [Path(cwd) / "group_data"]
    if inventory:
        found.append(Path(cwd, inventory).parent.resolve() / "group_data")
    found += [Path(cwd, path) for path in extra]
    return list(dict.fromkeys(found))
