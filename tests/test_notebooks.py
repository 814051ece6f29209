"""Notebooks run: they are thin wrappers over the same functions as the CLI."""

from __future__ import annotations

import runpy

import pyarrow as pa

from tests.conftest import REPO


def test_explore_notebook_runs_against_a_lakehouse(cfg, spark, monkeypatch, capsys):
    from pipelines.store.deltars import DeltaRsStore

    DeltaRsStore(cfg).append("silver.demo_rows", pa.table({"id": [1, 2, 3]}))
    monkeypatch.setenv("CARELAKE_ROOT", str(cfg.root))
    monkeypatch.setenv("CARELAKE_ENV", "test")
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "notebooks" / "explore_lakehouse.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "silver.demo_rows" in out and "3 rows" in out
