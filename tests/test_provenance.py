"""Which code made a run or a table: digests, git state, and the stale-run warning."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pgvar import provenance, runlog


def _tree(root, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_source_digest_follows_the_code_not_the_folder_or_caches(tmp_path):
    files = {"a.py": "x = 1\n", "sub/b.py": "y = 2\n", "notes.txt": "not code"}
    one, two = _tree(tmp_path / "one", files), _tree(tmp_path / "two", files)
    assert provenance.source_digest(one) == provenance.source_digest(two)
    _tree(two, {"__pycache__/a.py": "compiled", "readme.md": "docs"})
    assert provenance.source_digest(one) == provenance.source_digest(two)
    _tree(two, {"sub/b.py": "y = 3\n"})
    assert provenance.source_digest(one) != provenance.source_digest(two)
    # moving code between files changes it too: paths are part of the digest
    three = _tree(tmp_path / "three", {"a.py": "x = 1\n", "sub/c.py": "y = 2\n"})
    assert provenance.source_digest(one) != provenance.source_digest(three)


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_is_dirty_only_for_tracked_code(tmp_path):
    repo = _tree(tmp_path / "repo", {"pgvar/a.py": "x = 1\n", "experiments/e/results/r.md": "old\n",
                                     "experiments/e/sweep.yaml": "a: 1\n"})
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    commit, dirty = provenance.git_state(repo / "pgvar")
    assert len(commit) == 40 and dirty is False
    _tree(repo, {"experiments/e/results/r.md": "republished\n", "pgvar/new.py": "untracked\n"})
    assert provenance.git_state(repo / "pgvar") == (commit, False)
    _tree(repo, {"experiments/e/sweep.yaml": "a: 2\n"})
    assert provenance.git_state(repo / "pgvar") == (commit, True)
    outside = _tree(tmp_path / "plain", {"pgvar/a.py": "x = 1\n"})
    if provenance.git_state(outside)[0] is None:  # tmp_path may itself sit in a checkout
        assert provenance.git_state(outside) == (None, None)


def test_code_record_names_this_checkout():
    record = provenance.code_record()
    assert set(record["digest"]) == {"pgvar", "analysis"}
    assert all(len(d) == 16 for d in record["digest"].values())
    assert provenance.describe(record) != "unrecorded"


def test_stale_runs_counts_other_and_unrecorded_code():
    current = {"commit": "a" * 40, "dirty": False, "digest": {"pgvar": "1" * 16}}
    same = {"code": current}
    other = {"code": {"commit": "b" * 40, "dirty": True, "digest": {"pgvar": "2" * 16}}}
    no_git = {"code": {"commit": None, "dirty": None, "digest": {"pgvar": "1" * 16}}}
    old = {"status": "complete"}
    summary = provenance.stale_runs([same, same, other, no_git, old], current)
    assert summary["other_code"] == 1 and summary["unrecorded"] == 1
    assert summary["by_code"] == {"a" * 12: 2, "b" * 12 + "+dirty": 1, "pgvar " + "1" * 16: 1,
                                  "unrecorded": 1}
    assert provenance.stale_warning(provenance.stale_runs([same, no_git], current), "x") is None
    warning = provenance.stale_warning(summary, "OUT/runs")
    assert "1 were made by other pgvar code" in warning and "1 carry no record" in warning
    assert "fresh --out" in warning


def test_a_complete_run_of_other_code_is_kept_and_says_so(tmp_path):
    config = {"seed": 0}
    record = runlog.RunRecord(status="complete", config=config, seed=0, started_at="t")
    record.write(tmp_path)
    decision = runlog.prepare_job_dir(tmp_path, config)
    assert decision.action == "skip" and "other pgvar code" not in decision.reason
    data = runlog.read_run_record(tmp_path)
    assert data["code"] == provenance.code_record()
    data["code"] = {"commit": "c" * 40, "dirty": False, "digest": {"pgvar": "0" * 16}}
    runlog.write_json_atomic(tmp_path / runlog.RUN_FILE, data)
    decision = runlog.prepare_job_dir(tmp_path, config)
    assert decision.action == "skip"
    assert "other pgvar code, cccccccccccc" in decision.reason and "rerun_complete" in decision.reason
