"""The package metadata: torch is not capped (GPU users keep their CUDA build), and what the code imports is
declared (and nothing unused is)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"flash_attn", "flash_attn_interface", "triton"}  # CUDA extras, imported only when present


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.sub(r"[-_.]+", "-", (req := Requirement(line)).name.lower()): req for line in project["dependencies"]}


def test_torch_requirement_admits_new_releases():
    torch = declared()["torch"]
    for version in ("2.13.0", "2.13.1", "2.14.0", "2.15.2", "3.0.0"):
        assert torch.specifier.contains(version), f"torch {version} refused by {torch}"
    assert not torch.specifier.contains("2.5.0")
    pins = (ROOT / ".ci" / "cpu-constraints.txt").read_text()
    assert "torch==2.13.0" in pins and "cpu-constraints" in (ROOT / "Makefile").read_text()


def test_imported_third_party_modules_are_declared_and_declared_ones_used():
    imported: set[str] = set()
    for folder in ("cf", "data", "callbacks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imported.add(node.module.split(".")[0])
    local = {"cf", "data", "callbacks"}
    third_party = {m for m in imported - local - OPTIONAL if m not in sys.stdlib_module_names}
    to_dist = {k: [re.sub(r"[-_.]+", "-", d.lower()) for d in v] for k, v in packages_distributions().items()}
    deps = declared()
    missing = {m for m in third_party if not any(d in deps for d in to_dist.get(m, [m]))}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
    used = {d for m in third_party for d in to_dist.get(m, [m])}
    implied = {"jsonargparse", "omegaconf"}  # LightningCLI's parser and its YAML interpolation mode
    unused = set(deps) - used - implied
    assert not unused, f"declared but never imported: {sorted(unused)}"
