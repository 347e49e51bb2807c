"""Unit tests of pgvar.runlog: the metrics.csv writer, atomic run.json, skip/redo."""

from __future__ import annotations

import csv
import json
import math

import pytest

from pgvar import runlog


def test_columns_start_with_the_documented_ones_in_order():
    assert runlog.COLUMNS[:16] == (
        "step", "env_steps", "episodes", "return_mean", "return_std", "wall_s",
        "grad_variance", "grad_bias", "grad_bias_lo", "grad_bias_hi", "grad_mse",
        "cos_ref", "cos_pairwise", "snr", "ref_norm", "ref_se")
    assert len(set(runlog.COLUMNS)) == len(runlog.COLUMNS)
    assert set(runlog.COLUMN_DOCS) == set(runlog.COLUMNS)


@pytest.mark.parametrize("value, text", [
    (None, ""), (3, "3"), (True, "True"), (False, "False"), (0.1, "0.1"),
    (1e-300, "1e-300"), (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), ("x", "x"),
])
def test_format_cell(value, text):
    assert runlog.format_cell(value) == text


def test_format_cell_round_trips_floats():
    x = 0.1 + 0.2
    assert float(runlog.format_cell(x)) == x


def test_metrics_writer_flushes_every_row(tmp_path):
    path = tmp_path / "metrics.csv"
    writer = runlog.MetricsWriter(path, columns=("step", "a", "b"))
    writer.write({"step": 0, "a": 1.5})
    # read while the writer is still open: the row must already be on disk
    rows = list(csv.reader(path.open()))
    assert rows == [["step", "a", "b"], ["0", "1.5", ""]]
    writer.write({"step": 1, "b": True})
    writer.close()
    assert path.read_text() == "step,a,b\n0,1.5,\n1,,True\n"


def test_metrics_writer_refuses_unknown_columns(tmp_path):
    with (runlog.MetricsWriter(tmp_path / "m.csv", columns=("step",)) as writer,
          pytest.raises(KeyError, match="unknown columns")):
        writer.write({"step": 0, "nope": 1})


def test_write_json_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "run.json"
    runlog.write_json_atomic(path, {"status": "running"})
    runlog.write_json_atomic(path, {"status": "complete", "x": [1, 2]})
    assert json.loads(path.read_text()) == {"status": "complete", "x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_read_run_record_tolerates_missing_and_torn_files(tmp_path):
    assert runlog.read_run_record(tmp_path) is None
    (tmp_path / "run.json").write_text('{"status": "compl')
    assert runlog.read_run_record(tmp_path) is None


def test_run_record_has_the_required_fields(tmp_path):
    record = runlog.RunRecord(status="complete", config={"seed": 3}, seed=3,
                              started_at="2024-01-01T00:00:00+00:00", elapsed_s=1.25)
    record.write(tmp_path)
    data = json.loads((tmp_path / "run.json").read_text())
    for key in ("status", "error", "config", "seed", "versions", "elapsed_s"):
        assert key in data
    assert set(data["versions"]) >= {"python", "torch", "gymnasium", "pgvar"}
    assert data["versions"]["torch"] is not None


def _leave_run(job_dir, status, config):
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "metrics.csv").write_text("step\n0\n")
    runlog.write_json_atomic(job_dir / "run.json", {"status": status, "config": config})


CONFIG = {"seed": 0, "lr": 0.05, "env": {"name": "tabular"}, "rerun_complete": False}


def test_complete_run_of_same_config_is_skipped_and_kept(tmp_path):
    _leave_run(tmp_path, "complete", CONFIG)
    decision = runlog.prepare_job_dir(tmp_path, dict(CONFIG, rerun_complete=False))
    assert decision.action == "skip"
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "run.json").exists()


def test_rerun_complete_flag_does_not_change_the_skip_identity(tmp_path):
    _leave_run(tmp_path, "complete", CONFIG)
    assert runlog.is_complete(runlog.read_run_record(tmp_path), dict(CONFIG, rerun_complete=True))
    decision = runlog.prepare_job_dir(tmp_path, CONFIG, rerun_complete=True)
    assert decision.action == "run"
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("status", ["running", "failed", "diverged"])
def test_unfinished_or_bad_runs_are_redone_from_scratch(tmp_path, status):
    _leave_run(tmp_path, status, CONFIG)
    (tmp_path / ".run.json.123.tmp").write_text("{")
    decision = runlog.prepare_job_dir(tmp_path, CONFIG)
    assert decision.action == "run" and status in decision.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_complete_run_of_another_config_is_redone(tmp_path):
    _leave_run(tmp_path, "complete", dict(CONFIG, lr=0.1))
    decision = runlog.prepare_job_dir(tmp_path, CONFIG)
    assert decision.action == "run" and "different config" in decision.reason
    assert not (tmp_path / "metrics.csv").exists()


def test_metrics_without_run_json_are_cleared(tmp_path):
    (tmp_path / "metrics.csv").write_text("step\n0\n")
    assert runlog.prepare_job_dir(tmp_path, CONFIG).action == "run"
    assert not (tmp_path / "metrics.csv").exists()


def test_prepare_job_dir_creates_the_directory(tmp_path):
    job = tmp_path / "a" / "b"
    assert runlog.prepare_job_dir(job, CONFIG).action == "run"
    assert job.is_dir()


def test_long_override_sets_get_a_short_stable_unique_job_dir_name():
    from pgvar.config import MAX_SUBDIR_BYTES, subdir_name

    long_a = ",".join(f"training.option_{i}={i}" for i in range(40))
    long_b = long_a + ",seed=1"
    assert subdir_name("env=tabular,seed=0") == "env=tabular,seed=0"
    assert subdir_name("") == "default"
    name_a, name_b = subdir_name(long_a), subdir_name(long_b)
    assert len(name_a.encode()) <= MAX_SUBDIR_BYTES and len(name_b.encode()) <= MAX_SUBDIR_BYTES
    assert name_a != name_b and name_a == subdir_name(long_a)
    assert name_a.startswith("training.option_0=0")


def test_a_redone_run_loses_its_old_tensorboard_events(tmp_path):
    """A redone run starts its event file afresh: old events would mix two attempts."""
    (tmp_path / runlog.METRICS_FILE).write_text("step\n0\n")
    (tmp_path / "events.out.tfevents.1.host.1.0").write_bytes(b"old")
    assert runlog.prepare_job_dir(tmp_path, {"a": 1}).action == "run"
    assert not list(tmp_path.glob(runlog.EVENTS_GLOB))


def test_run_log_refuses_an_unknown_logger(tmp_path):
    with pytest.raises(ValueError, match="logger must be one of"):
        runlog.RunLog(tmp_path, "wandb")
    assert not (tmp_path / runlog.METRICS_FILE).exists()
