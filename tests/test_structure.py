"""The layout rules of the codebase: imports point one way, no cycles, files stay readable, generation stays light.

models ← memory ← rollout ← losses/sampling ← lit; tools and callbacks on top. Imports inside functions count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cf", "data", "callbacks")
# the library core: maths, models, memory, rollout, ERFT, weights, encoders, checkpoints
CORE = ["cf/models", "cf/memory.py", "cf/rollout.py", "cf/diffusion.py", "cf/losses.py", "cf/erft.py",
        "cf/error_storage.py", "cf/weights.py", "cf/encoders.py", "cf/export.py", "cf/zero.py", "cf/optim.py"]
FORBIDDEN_IN_CORE = ("lightning", "pytorch_lightning", "callbacks", "cf.lit")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[str]:
    """Every module imported anywhere in the file (function-level imports included), absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module or "")
    return names


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def core_files() -> list[Path]:
    files = []
    for entry in CORE:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_modules_import_no_lightning_callbacks_or_lit(path):
    bad = [name for name in imports_of(path)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_CORE)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_import_cycles_between_project_modules():
    modules = {module_name(p): p for p in project_files()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            # "from cf import x" may name a submodule: resolve to the longest project module it starts with
            candidates = [m for m in modules if imported == m or imported.startswith(m + ".")]
            if candidates:
                targets.add(max(candidates, key=len))
        targets.discard(name)
        graph[name] = {t for t in targets if not name.startswith(t + ".") and t not in PACKAGES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in project_files() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"files over 600 lines: {long}"


def test_generation_imports_neither_lightning_nor_the_training_code():
    code = ("import sys, cf.generate, cf.export; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
            "'callbacks') or m.startswith('cf.lit')); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
