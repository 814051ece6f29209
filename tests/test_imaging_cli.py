"""Must show (issue 20): a study whose order exists appears on the worklist with its order, and leaves it when its
final report arrives, read through the CLI (`carelake sql` on gold.imaging_worklist).

The study comes in as a DICOM file drop through bronze.dicom_instances and silver.imaging_studies; the order and
the report are silver rows in the imaging contract's columns. Until silver.imaging_match is on this branch, the
contract's accession rule stands in for it.
"""

from __future__ import annotations

import importlib.util
import json
from datetime import UTC, datetime, timedelta

import pytest

from tests import imaging_tables as t
from tests.test_gateway_dicom import ct_slice
from tests.test_train import run_cli_in_process

pytestmark = pytest.mark.slow


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, spark):
    if importlib.util.find_spec("silver.imaging_match") is None:
        monkeypatch.setattr("pipelines.jobs._match_orders_to_studies", t.accession_match)
    root = tmp_path / "lake"

    def run(*args: str) -> str:
        capsys.readouterr()
        code = run_cli_in_process(root, *args, monkeypatch=monkeypatch)
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    run.root = root
    return run


def worklist(cli) -> list[dict]:
    out = cli("sql", "select worklist_key, status, rank, order_number, priority, order_match, factors "
                     "from gold.imaging_worklist order by rank", "--format", "json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_study_with_its_order_is_on_the_worklist_until_its_final_report(cli, tmp_path, spark):
    from pipelines.store import open_store
    from tests.conftest import make_config

    now = datetime.now(UTC)
    ds = ct_slice()
    ds.AccessionNumber, ds.BodyPartExamined = "ACC-7", "HEAD"
    ds.StudyDate, ds.StudyTime = (now - timedelta(minutes=20)).strftime("%Y%m%d"), \
        (now - timedelta(minutes=20)).strftime("%H%M%S")
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    cli("ingest", str(tmp_path / "ct.dcm"), "--feed", "dicom")
    cli("run", "bronze.dicom_instances", "silver.imaging_studies", "--available-now")

    store = open_store(make_config(cli.root), spark)
    [study] = store.read_arrow("silver.imaging_studies").to_pylist()
    order = t.order("o7", study["patient_key"], "ACC-7", now - timedelta(minutes=40), "STAT", "ED", text="? stroke")
    t.write(spark, store, "silver.imaging_orders", [order], t.ORDERS_SCHEMA)
    t.write(spark, store, "silver.imaging_reports", [], t.REPORTS_SCHEMA)
    cli("run", "gold.imaging_worklist", "--available-now")
    [row] = worklist(cli)
    assert (row["worklist_key"], row["status"], row["rank"], row["order_number"], row["priority"],
            row["order_match"]) == (study["study_instance_uid"], "unread", 1, "ORD-o7", "STAT", "accession")
    factors = {f["factor"]: f["value"] for f in row["factors"]}
    assert (factors["indication"], factors["location"], factors["exam"]) == ("stroke", "ED", "CT/HEAD")

    t.write(spark, store, "silver.imaging_reports", [t.report("r7", "ACC-7", now)], t.REPORTS_SCHEMA)
    cli("run", "gold.imaging_worklist", "--available-now")
    assert worklist(cli) == []
