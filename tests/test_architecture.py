"""The boundaries of docs/architecture.md, checked: layers (import-linter), built-in plugins
that use only the public plugin API, no reaching into another package's private names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dicomnode.plugin

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in a file, absolute or relative."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the file's package
                package = path.parent.relative_to(ROOT / "dicomnode").parts if \
                    path.is_relative_to(ROOT / "dicomnode") else ()
                base = ["dicomnode", *package][: len(package) + 2 - node.level]
                module = ".".join([*base, module] if module else base)
            found.append((node.lineno, module, [a.name for a in node.names]))
    return found


def test_layers_hold() -> None:
    """lint-imports with the contract in pyproject.toml ([tool.importlinter])."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def _plugin_sources() -> list[Path]:
    files = sorted((ROOT / "plugins").glob("*/src/**/*.py"))
    assert len({f.relative_to(ROOT / "plugins").parts[0] for f in files}) >= 7, files
    return files


def test_built_in_plugins_use_only_the_public_plugin_api() -> None:
    """A third party can write anything a built-in plugin does: built-ins import nothing from
    dicomnode but the names in ``dicomnode.plugin.__all__``."""
    public = set(dicomnode.plugin.__all__)
    problems = []
    for path in _plugin_sources():
        for line, module, names in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if module == "dicomnode" or (module.startswith("dicomnode.")
                                         and module != "dicomnode.plugin"):
                problems.append(f"{where} imports {module}")
            elif module == "dicomnode.plugin":
                problems += [f"{where} imports {n} (not in dicomnode.plugin.__all__)"
                             for n in names if n not in public]
    assert problems == []


def test_the_check_catches_a_plugin_that_reaches_inside(tmp_path: Path) -> None:
    """The scan above is not vacuous: it sees a private import where one is."""
    bad = tmp_path / "bad.py"
    bad.write_text("from dicomnode.formats import ctpd\nfrom dicomnode.plugin import _x, Plugin\n"
                   "import dicomnode.store.files\n")
    assert [(m, n) for _, m, n in _imports(bad)] == [
        ("dicomnode.formats", ["ctpd"]), ("dicomnode.plugin", ["_x", "Plugin"]),
        ("dicomnode.store.files", [])]


def test_public_api_lists_only_what_exists_and_every_public_name() -> None:
    api = dicomnode.plugin
    assert sorted(api.__all__) == sorted(set(api.__all__))
    missing = [n for n in api.__all__ if not hasattr(api, n)]
    assert missing == []
    # every public class and function defined in the module is exported
    defined = [n for n, v in vars(api).items() if not n.startswith("_")
               and getattr(v, "__module__", None) == api.__name__
               and (isinstance(v, type) or callable(v))]
    assert sorted(set(defined) - set(api.__all__)) == []


@pytest.mark.parametrize("stated, refused", [
    ("1.0", False), ("1.9", False), (1, False), ("1", False),
    ("2.0", True), (2, True), ("0.9", True), ("one", True), ("1.x", True)])
def test_plugin_api_compatibility_rule(stated: object, refused: bool) -> None:
    why = dicomnode.plugin.api_mismatch("demo", stated)
    assert bool(why) is refused
    if refused:
        assert "'demo'" in why and str(stated) in why and dicomnode.plugin.API_VERSION in why


def test_no_module_imports_another_packages_private_names() -> None:
    """``from dicomnode.x.y import _name`` across packages couples to internals that may change
    without notice: only a module's own package may use its private names."""
    problems = []
    for path in sorted((ROOT / "dicomnode").rglob("*.py")):
        own = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for line, module, names in _imports(path):
            if not module.startswith("dicomnode"):
                continue
            target_pkg = module if (ROOT / Path(*module.split("."))).is_dir() else \
                module.rpartition(".")[0]
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in module.split(".") if p.startswith("_")
                        and not p.startswith("__")]
            if private and target_pkg != own:
                problems.append(f"{path.relative_to(ROOT)}:{line} {module}: {private}")
    assert problems == []
