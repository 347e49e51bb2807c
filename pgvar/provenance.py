"""Which code made a number: the record every run.json and reproduce.json carries.

A run's results depend on pgvar's source, and a table's also on the analysis's; a run
re-used by a later call (``pgvar-run`` skips a run already complete for the same config)
may have been made by older code than the analysis that reads it. Config changes are
caught by that rule; code changes are not. So each record holds:

- ``digest``: per package (``pgvar``, ``analysis``), a SHA-256 of its ``*.py`` files
  (relative paths and bytes, sorted): identical code, identical digest, with or without
  git, uncommitted edits included. Comparing a run's ``pgvar`` digest with the current
  one is what ``stale_runs`` does.
- ``commit`` / ``dirty``: the git commit of the checkout the packages were imported from
  and whether a tracked file that affects results (code, configs, experiment specs; not
  published results) differs from it; both None outside a git checkout (an installed
  wheel) or without git.

Cost: hashing ~100 files and two ``git`` calls, about 50 ms, once per process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PACKAGES = ("pgvar", "analysis")
# tracked paths whose edits change results; experiments' published results are not code
CODE_PATHS = ("pgvar", "analysis", "conf", "experiments", "hydra_plugins", "pyproject.toml",
              ":(exclude)experiments/*/results/*")
GIT_TIMEOUT_S = 5.0


def package_dir(name: str) -> Path | None:
    """The folder a package is imported from, None when it is not importable."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def source_digest(folder: Path) -> str:
    """SHA-256 (hex, first 16 digits) of every ``*.py`` below ``folder``: each file's path
    relative to it and its bytes, in sorted order, so the same code gives the same digest
    on any machine."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(repo: Path, *args: str) -> str | None:
    """stdout of ``git -C repo ARGS``, None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(folder: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``folder``; (None, None) outside one.
    Dirty: a tracked file under ``CODE_PATHS`` differs from the commit (untracked files
    and published results do not count)."""
    top = _git(folder, "rev-parse", "--show-toplevel")
    if not top:
        return None, None
    commit = _git(Path(top), "rev-parse", "HEAD")
    status = _git(Path(top), "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return commit, (None if status is None else bool(status))


@functools.cache
def code_record() -> dict[str, Any]:
    """This process's code: ``{"commit", "dirty", "digest": {package: digest}}`` (see the
    module doc); computed once per process."""
    folders = {name: package_dir(name) for name in PACKAGES}
    digests = {name: source_digest(folder) for name, folder in folders.items() if folder}
    commit, dirty = git_state(folders["pgvar"]) if folders.get("pgvar") else (None, None)
    return {"commit": commit, "dirty": dirty, "digest": digests}


def pgvar_digest(code: Any) -> str | None:
    """The pgvar source digest of a code record (``code_record``), None when it has none
    (a run written before run.json carried one, or a damaged entry)."""
    if not isinstance(code, Mapping):
        return None
    return (code.get("digest") or {}).get("pgvar")


def same_pgvar_code(code: Any) -> bool:
    """Whether a code record names this process's pgvar source (False when unrecorded)."""
    mine = pgvar_digest(code_record())
    return mine is not None and pgvar_digest(code) == mine


def measured_by_other_code(digests: Iterable[Any]) -> list[bool]:
    """Per recorded pgvar digest (a paired.csv row's ``code``), whether it names other code
    than this process's; empty or missing entries (rows written before rows carried one)
    are not counted: their run's record speaks for them (``stale_runs``)."""
    mine = pgvar_digest(code_record())
    return [isinstance(d, str) and bool(d) and d != mine for d in digests]


def describe(record: Mapping[str, Any] | None) -> str:
    """A short label of a code record: ``1a2b3c4d5e6f`` or ``1a2b3c4d5e6f+dirty`` (the commit),
    ``pgvar 0123abcd4567ef89`` (the digest, without git), or ``unrecorded``."""
    if not isinstance(record, Mapping):
        return "unrecorded"
    commit = record.get("commit")
    if commit:
        return str(commit)[:12] + ("+dirty" if record.get("dirty") else "")
    digest = pgvar_digest(record)
    return f"pgvar {digest}" if digest else "unrecorded"


def stale_runs(run_records: Iterable[Mapping[str, Any]], current: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
    """Which code made the complete runs among ``run_records`` (run.json contents), against
    ``current`` (default: this process's ``code_record``): ``{"by_code": {label: n},
    "other_code": n, "unrecorded": n}``, where ``other_code`` counts runs whose pgvar
    digest differs from the current one and ``unrecorded`` those written before run.json
    carried one (their code is unknown)."""
    mine = pgvar_digest(current if current is not None else code_record())
    by_code: dict[str, int] = {}
    other = unrecorded = 0
    for record in run_records:
        code = record.get("code")
        label = describe(code)
        by_code[label] = by_code.get(label, 0) + 1
        digest = pgvar_digest(code)
        if digest is None:
            unrecorded += 1
        elif digest != mine:
            other += 1
    return {"by_code": dict(sorted(by_code.items())), "other_code": other, "unrecorded": unrecorded}


def stale_warning(summary: Mapping[str, Any], where: str) -> str | None:
    """One line for a user when some runs under ``where`` were made by other (or unknown)
    pgvar code than the analysis now reading them, with the fix; None when all match."""
    other, unknown = summary["other_code"], summary["unrecorded"]
    if not other and not unknown:
        return None
    parts = []
    if other:
        parts.append(f"{other} were made by other pgvar code than this analysis's "
                     f"({describe(code_record())})")
    if unknown:
        parts.append(f"{unknown} carry no record of the code that made them (older runs)")
    return (f"warning: of the runs in {where}, {' and '.join(parts)}; a complete run is "
            f"re-used, not re-run, when only the code changed: to regenerate them, run into a "
            f"fresh --out. Runs by code: {summary['by_code']}")
