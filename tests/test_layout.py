"""Import direction inside lib/, read from the source with `ast` (nothing is imported).

Entry scripts (train.py, eval.py, engine_worker.py, launch.sh's helpers, bench/, tools/) import lib;
lib never imports them, and never edits sys.path to reach them.

Inside lib the packages form one direction, lowest first; a package may import only packages that
come before it (lib.config is the root every package may use):

    lib.config                          typed config, enums, validation; imports no other lib package
    lib.launch, lib.data, lib.target    process setup and sharding; data pipeline; the target's files
    lib.drafts                          the strategy seam and the draft families: models, losses, export,
                                        drafters (lib.eval, engine, handoff and trainer import the seam
                                        only, never a family's package)
    lib.handoff                         engine -> trainer transport (payload specs from lib.data)
    lib.eval                            speculative decoding and online evaluation of a draft
    lib.engine                          target backends and the engine role's loop (which serves eval)
    lib.trainer                         the trainer role's loop; may use everything above

Known exceptions are listed edge by edge in KNOWN_EXCEPTIONS (file, imported module), each with why it
is there; any other upward import fails, and an exception that no longer occurs fails too, so the list
only ever shrinks.
"""
from __future__ import annotations

import ast
import os

import pytest

pytestmark = pytest.mark.unit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(REPO, "lib")
ENTRY_MODULES = {"train", "eval", "engine_worker", "launch", "bench", "tools", "tests"}

_BELOW_DRAFTS = {"lib.config", "lib.launch", "lib.data", "lib.target"}
_BELOW_HANDOFF = _BELOW_DRAFTS | {"lib.drafts"}
ALLOWED = {
    "lib.config": set(),
    "lib.launch": {"lib.config"},
    "lib.data": {"lib.config"},
    "lib.target": {"lib.config"},
    "lib.drafts": _BELOW_DRAFTS,
    "lib.handoff": _BELOW_HANDOFF,
    "lib.eval": _BELOW_HANDOFF | {"lib.handoff"},
    "lib.engine": _BELOW_HANDOFF | {"lib.handoff", "lib.eval"},
    "lib.trainer": _BELOW_HANDOFF | {"lib.handoff", "lib.eval", "lib.engine"},
}
# Packages that serve every draft family: they import lib.drafts' seam, never a family's package.
GENERIC_PACKAGES = ("lib.eval", "lib.engine", "lib.handoff", "lib.trainer")
KNOWN_EXCEPTIONS = {
    # config -> data: validation reads the template registry (lazily), while lib.data imports lib.config.
    ("lib/config/check.py", "lib.data.templates"),
}


def lib_files() -> list[str]:
    out = []
    for root, _, files in os.walk(LIB):
        out += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return sorted(out)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def package_of(module: str) -> str:
    """lib.x.y -> lib.x; lib/__init__.py is its own package."""
    return ".".join(module.split(".")[:2])


def imported_modules(path: str) -> list[tuple[str, int]]:
    """Every module the file imports (absolute names; relative imports resolved), with its line."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    module = module_name(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            # `from lib import data` imports the package lib.data
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names] if name == "lib" else [(name, node.lineno)]
            # `from lib.drafts import eagle3` imports the subpackage too
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names
                      if name != "lib" and is_module(f"{name}.{alias.name}")]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")))):
            found.append((node.args[0].value, node.lineno))
    return found


def is_module(name: str) -> bool:
    """A module or package of this repository (name.py or name/__init__.py)."""
    path = os.path.join(REPO, *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def where(path: str, line: int) -> str:
    return f"{os.path.relpath(path, REPO)}:{line}"


def test_lib_never_imports_an_entry_script():
    bad = [f"{where(path, line)} imports {name}" for path in lib_files() for name, line in imported_modules(path)
           if name.split(".")[0] in ENTRY_MODULES]
    assert not bad, "lib/ must not import entry scripts; move the shared code into lib/:\n" + "\n".join(bad)


def edits_sys_path(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return ast.unparse(node.func.value) == "sys.path" or ast.unparse(node.func) == "site.addsitedir"
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(ast.unparse(t).startswith("sys.path") for t in targets)
    return False


def test_lib_never_edits_sys_path():
    bad = []
    for path in lib_files():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        bad += [f"{where(path, node.lineno)}: {ast.unparse(node)}" for node in ast.walk(tree) if edits_sys_path(node)]
    assert not bad, "lib/ must not edit sys.path (entry scripts and pytest.ini set the path):\n" + "\n".join(bad)


def test_every_lib_package_has_a_place_in_the_order():
    packages = {package_of(module_name(p)) for p in lib_files()} - {"lib"}
    assert packages <= set(ALLOWED), f"new package(s) {sorted(packages - set(ALLOWED))}: add them to ALLOWED here"


def upward_imports(package: str) -> list[tuple[str, str, int]]:
    """(file, imported module, line) for each import of a lib package `package` may not use."""
    out = []
    for path in lib_files():
        if package_of(module_name(path)) != package:
            continue
        for name, line in imported_modules(path):
            other = package_of(name)
            if name.startswith("lib.") and other != package and other not in ALLOWED[package]:
                out.append((os.path.relpath(path, REPO), name, line))
    return out


@pytest.mark.parametrize("package", list(ALLOWED))
def test_package_imports_only_packages_below_it(package):
    bad = [f"{path}:{line} imports {name}" for path, name, line in upward_imports(package)
           if (path, name) not in KNOWN_EXCEPTIONS]
    assert not bad, (f"{package} may import only {sorted(ALLOWED[package]) or 'no other lib package'} "
                     "(order in this file's docstring):\n" + "\n".join(bad))


def draft_families() -> list[str]:
    """The family packages under lib/drafts/ (the seam's own modules sit beside them as files)."""
    drafts = os.path.join(LIB, "drafts")
    return sorted(f"lib.drafts.{d}" for d in os.listdir(drafts)
                  if os.path.isfile(os.path.join(drafts, d, "__init__.py")))


def test_generic_packages_import_no_draft_family():
    """The engine, the handoff, the trainer loop and evaluation reach a family only through the strategy
    seam (lib/drafts/base.py, drafting.py): a family is added without touching them."""
    families = draft_families()
    assert "lib.drafts.eagle3" in families
    bad = [f"{where(path, line)} imports {name}" for path in lib_files()
           if package_of(module_name(path)) in GENERIC_PACKAGES
           for name, line in imported_modules(path) if any(name == f or name.startswith(f + ".") for f in families)]
    assert not bad, ("import the family through get_strategy(cfg.draft.name) (lib/drafts/base.py) instead:\n"
                     + "\n".join(bad))


def test_known_exceptions_still_occur():
    seen = {(path, name) for package in ALLOWED for path, name, _ in upward_imports(package)}
    gone = sorted(KNOWN_EXCEPTIONS - seen)
    assert not gone, f"fixed, so delete from KNOWN_EXCEPTIONS in tests/test_layout.py: {gone}"


def test_lib_modules_import_no_circle():
    """No module of lib/ reaches itself through its imports (lazy imports inside functions included).
    A submodule importing its own package's __init__ (re-exported names) is not counted."""
    files = {module_name(p): p for p in lib_files()}
    edges = {m: {n for n, _ in imported_modules(p) if n in files and n != m and not m.startswith(n + ".")}
             for m, p in files.items()}
    for start in sorted(files):
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                assert nxt != start, "import circle: " + " -> ".join(path + [nxt])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
