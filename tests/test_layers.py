"""Imports point one way: every module may import its own layer and the layers below,
never one above. The layers are stated here once (``LAYERS``); the README's architecture
section repeats the one-line order (``ORDER``) and this test holds the two together.

Imports are read from the source (``ast``), those inside functions included, so a lazy
import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("pgvar", "analysis", "experiments", "hydra_plugins")

# Lowest first. A file belongs to the layer of its most specific matching pattern.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("pgvar.envs/maths", ("pgvar/envs/*.py", "pgvar/policies.py", "pgvar/folded.py",
                          "pgvar/batch.py", "pgvar/returns.py", "pgvar/checks.py",
                          "pgvar/seeding.py", "pgvar/sequence_policies.py",
                          "pgvar/progress.py")),
    ("sampling & gradients", ("pgvar/rollout.py", "pgvar/refill.py", "pgvar/prefetch.py",
                              "pgvar/gradients.py")),
    ("estimators, critics, reference, stats", ("pgvar/estimators.py", "pgvar/critics.py",
                                               "pgvar/reference.py", "pgvar/stats.py",
                                               "pgvar/exact_mean.py",
                                               "pgvar/measure.py", "pgvar/__init__.py",
                                               "pgvar/paired.py", "pgvar/sample_size.py",
                                               "pgvar/sequence_estimators.py",
                                               "pgvar/sequence_measure.py")),
    ("run", ("pgvar/config.py", "pgvar/run.py", "pgvar/runlog.py", "pgvar/sweep.py",
             "pgvar/preflight.py", "pgvar/joblock.py", "pgvar/bench.py", "pgvar/__main__.py",
             "pgvar/sequence_run.py", "pgvar/checkpoints.py", "pgvar/measured_step.py",
             "pgvar/remeasure.py", "pgvar/cli.py", "pgvar/provenance.py",
             "hydra_plugins/*/*.py")),
    ("analysis", ("analysis/*.py",)),
    ("experiments & reproduction", ("experiments/*/*.py", "analysis/reproduce.py")),
]
ORDER = " <- ".join(name for name, _ in LAYERS)

# Hydra's private API (``hydra._internal``) has this one home.
HYDRA_PRIVATE_HOME = "pgvar/sweep.py"


def project_files() -> list[str]:
    """Every Python file below the layered roots, as a repo-relative posix path."""
    return sorted(str(p.relative_to(REPO).as_posix()) for root in ROOTS
                  for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)


def layer_of(path: str) -> int | None:
    """Index in ``LAYERS`` of the most specific pattern matching ``path`` (None: unlisted)."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatch.fnmatchcase(path, pattern) and pattern.count("/") == path.count("/"):
                score = len(pattern.replace("*", ""))
                if best is None or score > best[0]:
                    best = (score, index)
    return None if best is None else best[1]


def module_file(module: str) -> str | None:
    """The project file a dotted module name resolves to, or None outside the project."""
    parts = module.split(".")
    if parts[0] not in ROOTS:
        return None
    base = "/".join(parts)
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if (REPO / candidate).exists():
            return candidate
    return None


def imported_files(source: str, path: str) -> list[tuple[int, str]]:
    """``(line, project file)`` for every import in ``source`` (of the file at ``path``)."""
    package = path.rsplit("/", 1)[0].replace("/", ".")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import submodule`` imports the submodule; else the module itself
            names = [f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}") else base
                     for alias in node.names]
        else:
            continue
        found += [(node.lineno, f) for f in map(module_file, names) if f is not None]
    return found


def upward_imports(path: str, source: str) -> list[str]:
    """Every import in ``source`` of a module in a higher layer than ``path``'s."""
    own = layer_of(path)
    problems = []
    for line, target in imported_files(source, path):
        theirs = layer_of(target)
        if own is not None and theirs is not None and theirs > own:
            problems.append(f"{path}:{line} ({LAYERS[own][0]}) imports {target} "
                            f"({LAYERS[theirs][0]})")
    return problems


def test_every_module_has_a_layer():
    unlisted = [p for p in project_files() if layer_of(p) is None]
    assert not unlisted, f"add these files to a layer in tests/test_layers.py: {unlisted}"


def test_no_module_imports_a_higher_layer():
    problems = [msg for path in project_files()
                for msg in upward_imports(path, (REPO / path).read_text())]
    assert not problems, "imports against the layer order " + ORDER + ":\n" + "\n".join(problems)


@pytest.mark.parametrize("path, source, upward", [
    ("pgvar/returns.py", "from pgvar.rollout import rollout\n", True),
    ("pgvar/returns.py", "def f():\n    from analysis import loader\n", True),
    ("pgvar/run.py", "from pgvar import runlog, stats\n", False),
    ("pgvar/stats.py", "from pgvar import run\n", True),
    ("analysis/loader.py", "from . import reproduce\n", True),
    ("analysis/reproduce.py", "from analysis.pipeline import analyze\n", False),
    ("pgvar/envs/lqr.py", "from .tabular import EXACT_DTYPE\n", False),
])
def test_the_check_sees_upward_imports(path, source, upward):
    assert bool(upward_imports(path, source)) is upward


def test_hydra_private_api_has_one_home():
    users = []
    for path in project_files():
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.startswith("hydra._internal") for n in names):
                users.append(path)
    assert set(users) == {HYDRA_PRIVATE_HOME}, users


def test_readme_states_the_order():
    assert f"`{ORDER}`" in (REPO / "README.md").read_text()
