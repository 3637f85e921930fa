"""bench.report keeps each benchmark's last status across partial runs (--only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report


def test_partial_run_keeps_the_other_benchmarks_statuses(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "RUNS", tmp_path / "runs.json")
    report.record_runs({"store": "ok in 60 s", "eviction": "ok in 20 s"})
    runs = report.record_runs({"eviction": "failed: exit 1"})
    assert runs["store"]["status"] == "ok in 60 s"
    assert runs["eviction"]["status"] == "failed: exit 1"
    assert list(runs) == ["store", "eviction"]  # the README's order, whatever the run's order
    readme = report.render_readme(runs)
    assert "- `store`: ok in 60 s (" in readme and "- `eviction`: failed: exit 1 (" in readme


def test_render_only_writes_no_status_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "RUNS", tmp_path / "runs.json")
    assert report.record_runs({}) == {}
    assert not (tmp_path / "runs.json").exists()
