"""silver.imaging_studies on the driver (silver.imaging_study_rows) gives the rows the Spark plan gives: on random
instances (odd dates, times, offsets and zones, JSON nulls and numbers, resends, a SOP instance moved to another
study, broken headers, unusable instances), and through the runner, batch by batch, against the executor path."""

from __future__ import annotations

import json
import random
import shutil
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

from pipelines.jobs import load_registry
from pipelines.landing import ingest
from pipelines.runner import Runner, Trigger
from pipelines.store import open_store
from silver import imaging_study_rows as rows_on_driver
from silver.imaging_studies import INSTANCE_COLUMNS, STUDIES, _header_columns, _instances, quarantined, studies
from silver.quarantine import QUARANTINE
from tests.conftest import make_config
from tests.test_fused import _rows

AT = datetime(2026, 3, 8, 9, 0, tzinfo=UTC)
SECRET, MRN, ALIASES = "twin-secret", "CARELAKE", (("urn:oid:1.2.3", "CARELAKE"), (" LEGACY", "OLD"), ("OLD", "NEW"))
BRONZE_SCHEMA = StructType([
    *(StructField(c, StringType(), True) for c in INSTANCE_COLUMNS[:7]),
    StructField("received_at", TimestampType(), False), StructField("landing_file", StringType(), False),
    StructField("landing_position", LongType(), False), StructField("sha256", StringType(), False)])

DATES = ["20260308", "20261101", "20260230", "20261301", "00000101", "0000000", "2026-03-08", "", None, "20260308\n",
         "00010101", "99991231"]
TIMES = ["013000", "0130\n", "023000", "0230", "02", "01:30:00", "123456.789", "123456.1234567", "240000", "1260",
         "12.5", "", None, "abc", "103000.", "0959.5x"]
OFFSETS = ["+0100", "+0100\n", "-0530", "+1400", "-1500", "+9999", "0100", "+01:00", "", None]


def _value(rng: random.Random, choices: list) -> dict | None:
    """A tag's DICOM JSON element: absent, no Value, a JSON null, a number, or one of `choices`."""
    pick = rng.random()
    if pick < 0.1:
        return None
    if pick < 0.15:
        return {"vr": "LO"}
    if pick < 0.22:
        return {"vr": "LO", "Value": [None, "second"]}
    if pick < 0.25:
        return {"vr": "IS", "Value": [rng.choice([7, 2.5, True])]}
    return {"vr": "LO", "Value": [rng.choice(choices)]}


def _name(rng: random.Random) -> dict | None:
    pick = rng.random()
    if pick < 0.15:
        return None
    if pick < 0.25:
        return {"vr": "PN", "Value": [rng.choice([None, "Plain^String", {"Ideographic": "山田"}])]}
    return {"vr": "PN", "Value": [{"Alphabetic": rng.choice(["Grey^Meredith", "Shepherd^Derek", "Yamada^Tarō", None])}]}


def _header(rng: random.Random) -> str | None:
    if rng.random() < 0.05:
        return rng.choice(['{"broken', "[1, 2]", "null", None])
    tags = {"00080060": _value(rng, ["CT", "MR", "SR", "CR"]), "00180015": _value(rng, ["CHEST", "HEAD", ""]),
            "00080020": _value(rng, DATES), "00080030": _value(rng, TIMES), "00080201": _value(rng, OFFSETS),
            "00080050": _value(rng, ["ACC-1", "ACC-2", "null", ""]), "00200010": _value(rng, ["1", "S-9"]),
            "00081030": _value(rng, ["CT HEAD W/O", "Röntgen Thorax"]), "00080090": _name(rng),
            "00100020": _value(rng, ["MRN1", "MRN2", ""]),
            "00100021": _value(rng, ["CARELAKE", "urn:oid:1.2.3", "  urn:oid:1.2.3 ", " LEGACY", "OTHER", ""]),
            "00100010": _name(rng), "00100030": _value(rng, ["19700101", ""]),
            "00181050": {"vr": "FD", "Value": [rng.choice([0.5, float("nan"), float("inf")])]}}  # NaN: bare
    return json.dumps({k: v for k, v in tags.items() if v is not None}, ensure_ascii=rng.random() < 0.5)


def random_bronze(seed: int, n: int = 120) -> list[dict]:
    """Bronze rows of a few studies: resends (a SOP instance sent again, sometimes with another header or study),
    unusable instances, instances without a study UID, equal receipt times."""
    rng = random.Random(seed)
    out: list[dict] = []
    for i in range(n):
        if out and rng.random() < 0.2:  # a resend of an earlier instance, maybe changed
            row = dict(rng.choice(out))
            if rng.random() < 0.5:
                row["header_json"] = _header(rng)
            if rng.random() < 0.2:
                row["study_instance_uid"] = f"1.2.{rng.randrange(6)}"
        else:
            row = {"study_instance_uid": rng.choice([f"1.2.{rng.randrange(6)}"] * 9 + [None]),
                   "series_instance_uid": rng.choice([f"1.3.{rng.randrange(9)}"] * 5 + [None]),
                   "sop_instance_uid": f"1.4.{i}", "modality": rng.choice(["CT", "MR", None]),
                   "header_json": _header(rng)}
        row.update(parse_status=rng.choice(["ok"] * 8 + ["not_dicom", "missing_uids"]),
                   parse_detail=rng.choice([None, "no preamble"]),
                   received_at=AT + timedelta(seconds=rng.randrange(40)),  # equal times are common
                   landing_file=f"file:/l/dicom/{rng.randrange(5):03d}.clrec", landing_position=i * 100,
                   sha256=f"{i:064x}")
        out.append(row)
    return out


def _spark_rows(spark, rows: list[dict], zone: str) -> tuple[list[dict], list[dict]]:
    df = spark.createDataFrame([tuple(r[f.name] for f in BRONZE_SCHEMA.fields) for r in rows], BRONZE_SCHEMA)
    got = studies(_instances(df, zone), secret=SECRET, mrn_system=MRN, aliases=ALIASES, processed_at=AT)
    return got.toArrow().to_pylist(), quarantined(df, AT).toArrow().to_pylist()


@pytest.mark.parametrize(("seed", "zone"), [(1, "America/New_York"), (2, "Europe/London"), (3, "Asia/Kolkata")])
def test_the_driver_rows_equal_the_spark_plan_on_random_instances(spark, seed, zone):
    rows = random_bronze(seed)
    spark_studies, spark_quarantine = _spark_rows(spark, rows, zone)
    schema = to_arrow_schema(BRONZE_SCHEMA)
    batch, held = pa.Table.from_pylist(rows[:40], schema=schema), pa.Table.from_pylist(rows[40:], schema=schema)
    got = rows_on_driver.on_driver(batch, held, secret=SECRET, timezone=zone, mrn_system=MRN, system_aliases=ALIASES,
                                   processed_at=AT)
    by_uid = {r["study_instance_uid"]: r for r in got[STUDIES].to_pylist()}
    assert by_uid == {r["study_instance_uid"]: r for r in spark_studies}
    assert len(by_uid) >= 5 and any(r["study_time_utc"] for r in by_uid.values())
    assert any(r["patient_key"] for r in by_uid.values()) and any(r["modality"] for r in by_uid.values())
    # The driver quarantines the batch's own unusable rows (bronze's were quarantined in their own batches).
    mine = {r["landing_position"] for r in rows[:40]}
    assert sorted(got[QUARANTINE].to_pylist(), key=lambda r: r["landing_position"]) == sorted(
        (r for r in spark_quarantine if r["landing_position"] in mine), key=lambda r: r["landing_position"])
    assert got[QUARANTINE].num_rows > 0


@pytest.mark.parametrize(("date", "time", "offset", "zone", "utc"), [
    ("20260308", "023000", None, "America/New_York", datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),  # in the DST gap
    ("20261101", "013000", None, "America/New_York", datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),  # twice: the first
    ("20261206", "0315", "+0100", "UTC", datetime(2026, 12, 6, 2, 15, tzinfo=UTC)),
    ("20261206", "03:15:30.5", "", "UTC", datetime(2026, 12, 6, 3, 15, 30, 500000, tzinfo=UTC)),
    ("20261206", "240000", None, "UTC", None), ("20261301", "0315", None, "UTC", None),
    ("00000101", "0315", None, "UTC", None), ("20261206", "0315", "+9999", "Asia/Kolkata",
                                              datetime(2026, 12, 5, 21, 45, tzinfo=UTC)),
    ("00010101", "0030", "+0100", "UTC", None), ("99991231", "2330", "-0100", "UTC", None)])  # out of range in UTC
def test_study_time_on_the_driver(date, time, offset, zone, utc):
    assert rows_on_driver.study_time_utc(date, time, offset, zone) == utc


def test_header_values_read_json_as_spark_does(spark):
    headers = [
        json.dumps({"00080060": {"Value": [None]}, "00080050": {"Value": ["null"]}, "00200010": {"Value": [7]},
                    "00080090": {"Value": [{"Alphabetic": "Grey^Meredith"}]}, "00100010": {"Value": ["x"]},
                    "00180015": {"Value": [{"a": [1, None]}]}, "00100020": {"Value": [True]}}),
        # A bare NaN anywhere (bronze rows written before session 17): Spark reads nothing of the header.
        json.dumps({"00080050": {"Value": ["ACC"]}, "00181050": {"Value": [float("nan")]}}),
        json.dumps({"00080050": {"Value": ["ACC"]}, "00181050": {"Value": ["NaN"]}}),  # as bronze writes it now
        r'{"00080050":{"Value":["\u00e9\ud83d\ude00"]}}', "{broken", "[1, 2]", "null", "", None]
    df = spark.createDataFrame([(h,) for h in headers], "header_json string")
    spark_rows = _header_columns(df).drop("header_json").toArrow().to_pylist()
    assert [rows_on_driver.header_values(h) for h in headers] == spark_rows
    assert spark_rows[0]["study_id"] == "7" and spark_rows[0]["referring_physician"] == "Grey^Meredith"
    assert spark_rows[1]["accession_number"] is None and spark_rows[2]["accession_number"] == "ACC"


def _lake(root, spark, **overrides):
    cfg = make_config(root, **{"silver.key_secret": "a-shared-test-secret", **overrides})
    store = open_store(cfg, spark)
    return cfg, store, Runner(cfg, spark, store, load_registry(cfg))


def test_fused_batches_on_the_driver_write_what_the_executor_path_writes(tmp_path, spark, caplog):
    """Three rounds of files through bronze.dicom_instances (silver.imaging_studies fused into its batches): one
    lakehouse computes silver on the driver (small batches), the other in Spark on the executors."""
    from pydicom.uid import generate_uid

    from tests.test_silver_imaging import instance

    driver = _lake(tmp_path / "driver", spark)
    executors = _lake(tmp_path / "executors", spark, **{"storage.driver_write_max_rows": 0,
                                                        "storage.driver_write_max_mb": 0})
    study, other, series = generate_uid(), generate_uid(), generate_uid()
    first = instance(study, series)
    rounds = [{"a": first, "b": instance(other, generate_uid(), modality="MR", StudyTime="0959")},
              {"d": first, "e": b"not dicom at all",  # a resend; then a corrected accession number, newest
               "z": instance(study, generate_uid(), modality="SR", AccessionNumber="ACC-78")},
              {"f": instance(other, generate_uid(), modality="MR", StudyDate="20261399")}]  # an impossible date
    for i, files in enumerate(rounds):
        src = tmp_path / f"src{i}"
        src.mkdir()
        for name, body in files.items():
            (src / f"{name}.dcm").write_bytes(body)
        ingest(driver[0], sorted(str(f) for f in src.iterdir()), "dicom")  # the same landing files for both
        shutil.copytree(driver[0].path("landing"), executors[0].path("landing"), dirs_exist_ok=True)
        for _, _, runner in (driver, executors):
            caplog.clear()
            with caplog.at_level("INFO", logger="carelake.imaging"):
                [summary, _] = runner.run([STUDIES], Trigger(available_now=True))
            assert summary.status == "done", summary.line()
            on_driver = [r.getMessage() for r in caplog.records if "driver path" in r.getMessage()]
            assert len(on_driver) == (1 if runner is driver[2] else 0), on_driver
        for table in (STUDIES, QUARANTINE, "bronze.dicom_instances"):
            a, b = _rows(driver[0], driver[1], table), _rows(executors[0], executors[1], table)
            assert a == b, (i, table, sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    got = {r["study_instance_uid"]: r for r in driver[1].read_arrow(STUDIES).to_pylist()}
    assert (got[study]["instance_count"], got[study]["series_count"]) == (2, 2)
    assert got[study]["accession_number"] == "ACC-78"
    assert (got[other]["instance_count"], got[other]["modality"]) == (2, "MR")
    shutil.rmtree(tmp_path / "executors")


def test_reads_by_key_skip_the_files_whose_statistics_cannot_hold_the_keys(store, monkeypatch):
    import pyarrow.parquet as pq

    from pipelines.store import deltars

    for batch in (["1.2.10", "1.2.11"], ["1.2.20", "1.2.29"], ["1.2.30"]):  # one file each
        store.append("bronze.t", pa.table({"study_instance_uid": batch, "n": list(range(len(batch)))}))
    opened = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda f, **kw: opened.append((f, kw.get("columns"))) or real(f, **kw))
    path = str(store.ref("bronze.t").path)
    def read(where, keys, **kw):
        opened.clear()
        got = deltars.read_where(path, store.version("bronze.t"), where, keys=("study_instance_uid", keys), **kw)
        return got.to_pylist(), list(opened)

    # 1.2.25 may be in file two by its statistics: its key column is read, and nothing more of it.
    got, reads = read(None, {"1.2.25", "1.2.30"})
    assert got == [{"study_instance_uid": "1.2.30", "n": 0}] and len(reads) == 3
    assert [c for _, c in reads] == [["study_instance_uid"], ["study_instance_uid"], None]
    got, reads = read(pc.field("n") == 1, {"1.2.11"}, columns=["study_instance_uid", "n"])
    assert got == [{"study_instance_uid": "1.2.11", "n": 1}]
    assert [c for _, c in reads] == [["study_instance_uid"], ["study_instance_uid", "n"]]
    assert read(None, set()) == ([], [])


def test_a_cut_short_string_statistic_still_keeps_its_file():
    from pipelines.store.deltars import _keys_mask

    # A writer may cut a long string statistic: "1.2.9" then stands for a maximum such as "1.2.95...".
    actions = pa.table({"min.uid": ["1.2.1", "1.2.1", None], "max.uid": ["1.2.9", "1.2.5", None]})
    assert _keys_mask(actions, "uid", {"1.2.95"}).to_pylist() == [True, False, True]
    assert _keys_mask(actions, "uid", {"1.2.0"}).to_pylist() == [False, False, True]
    assert _keys_mask(pa.table({"path": ["a"]}), "uid", {"x"}).to_pylist() == [True]  # no statistics: kept
    only_min = pa.table({"min.uid": ["1.2.5", "1.2.1"]})  # the maximum of a long string left out: the minimum bounds
    assert _keys_mask(only_min, "uid", {"1.2.3"}).to_pylist() == [False, True]


@pytest.mark.realdata
def test_the_driver_rows_equal_the_spark_plan_on_every_real_dicom_file(spark, realdata):
    """Real headers (character sets, big endian, broken meta, multi-frame, compressed): the same studies."""
    from tests.test_silver_imaging import bronze

    files = sorted(p for p in (realdata / "dicom").rglob("*") if p.is_file())
    table = bronze(spark, *((f"2026-12-06T04:00:{i:02d}Z", p.read_bytes()) for i, p in enumerate(files)))
    rows = table.select(*INSTANCE_COLUMNS).toArrow()
    spark_studies = studies(_instances(table, "Europe/Berlin"), secret=SECRET, mrn_system=MRN, aliases=ALIASES,
                            processed_at=AT).toArrow().to_pylist()
    got = rows_on_driver.on_driver(rows, None, secret=SECRET, timezone="Europe/Berlin", mrn_system=MRN,
                                   system_aliases=ALIASES, processed_at=AT)
    assert {r["study_instance_uid"]: r for r in got[STUDIES].to_pylist()} == {
        r["study_instance_uid"]: r for r in spark_studies}
    assert len(spark_studies) >= 10 and sum(r["study_time_utc"] is not None for r in spark_studies) >= 5
    spark_quarantine = quarantined(table, AT).toArrow().to_pylist()
    assert sorted(got[QUARANTINE].to_pylist(), key=lambda r: r["landing_file"]) == sorted(
        spark_quarantine, key=lambda r: r["landing_file"])
    assert len(spark_quarantine) >= 5
