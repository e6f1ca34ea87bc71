"""The README's install command brings what every command the README shows uses (issue 21,
acceptance 5): every third-party package the code imports, the ``tensorboard`` command and
ONNX export, from the extras that command names."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Imported only where present, with a message saying what to install: not for every user.
OPTIONAL = {"scipy"}  # cars196's original .mat annotations (the CSV needs nothing)


def _imported_distributions() -> set[str]:
    modules = set()
    for path in (ROOT / "rsk_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"rsk_dist"}
    owners = importlib.metadata.packages_distributions()
    missing = sorted(m for m in modules if m not in owners)
    assert not missing, f"imported but not installed here: {missing}"
    return {canonicalize_name(owners[m][0]) for m in modules}


def _provided(extras: list[str]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names, todo, seen = set(), list(project["dependencies"]), set()
    todo += [r for extra in extras for r in project["optional-dependencies"][extra]]
    while todo:
        req = Requirement(todo.pop())
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            todo += [r for e in req.extras - seen for r in project["optional-dependencies"][e]]
            seen |= req.extras
        else:
            names.add(canonicalize_name(req.name))
    return names


def test_readme_install_brings_every_command():
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## Quickstart")]
    assert "pip install torch torchvision" in install
    extras = re.search(r"pip install -e '\.\[([\w,]+)\]'", install).group(1).split(",")
    provided = _provided(extras) | {"torch", "torchvision"}  # the line before: the user's torch build

    needed = _imported_distributions() - OPTIONAL
    # What the README shows beyond imports: `tensorboard --logdir` and ONNX export (which
    # checks for onnx and onnxscript, then lets torch.onnx import them).
    assert "tensorboard --logdir" in readme and "rsk-dist export" in readme
    needed |= {"tensorboard", "onnx", "onnxscript", "scikit-learn"}  # scikit-learn: the quickstart's digits
    assert needed - provided == set(), f"README's install ({extras}) lacks {sorted(needed - provided)}"
    # and the test fails where an extra loses one
    assert "faiss-cpu" in needed and "faiss-cpu" not in _provided([e for e in extras if e != "service"])
