"""Landing -> bronze -> silver.observations, available-now: records/s end to end and the parse-only limit.

Three feeds (one per run of this script): `devices` (JSON readings; goal >= 100,000 readings/s), `hl7`
(ORU^R01 with 8 OBX vitals; goal >= 10,000 messages/s) and `fhir` (NDJSON Observations; goal >= 20,000
resources/s). End to end = `carelake ingest` of the files, then the bronze job and silver.observations
(with its validation step) via the runner, committed to Delta. Parse-only = the same files through the
same bronze and silver transforms into Spark's no-op sink: no Delta writes, no merge, no validation. Both
are measured in the same run on the same input; the ratio says how much the storage path costs.

Run: .venv/bin/python benchmarks/silver_observations.py --feed devices [--records 5000000] [--runs 3]
     [--writes auto|executors|driver]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import emit, median, temp_config

GOALS = {"devices": 100_000, "hl7": 10_000, "fhir": 20_000}
DEFAULTS = {"devices": 5_000_000, "hl7": 100_000, "fhir": 200_000}
BRONZE = {"devices": "bronze.device_readings", "hl7": "bronze.hl7_messages", "fhir": "bronze.fhir_resources"}
PER_FILE = {"devices": 250_000, "hl7": 10_000, "fhir": 50_000}
VITALS = (("8867-4", "/min", 60, 40), ("9279-1", "/min", 12, 10), ("59408-5", "%", 90, 10), ("8480-6", "mm[Hg]",
          100, 50), ("8462-4", "mm[Hg]", 60, 30), ("8310-5", "Cel", 36, 2), ("3150-0", "%", 21, 10))


def device_lines(start: int, n: int) -> str:
    out = []
    for i in range(start, start + n):
        code, unit, low, span = VITALS[i % len(VITALS)]
        sec = i // 64
        out.append(f'{{"device_id":"icu-bed-{i % 64:02d}","patient_mrn":"MRN{1000 + i % 64}",'
                   f'"time":"2026-01-05T{sec // 3600 % 24:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}.{i % 1000:03d}Z",'
                   f'"code":"{code}","value":{low + (i * 7919) % span + 0.5},"unit":"{unit}"}}\n')
    return "".join(out)


def oru(i: int) -> str:
    ts = f"202601{5 + i // 86400 % 20:02d}{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}+0000"
    obx = [f"OBX|{k + 1}|NM|{code}^^LN||{low + (i * 31 + k) % span}|{unit}^^UCUM|||||F|||{ts}"
           for k, (code, unit, low, span) in enumerate(VITALS)]
    return "\r".join([f"MSH|^~\\&|WARD|GENERAL|CARELAKE|CARELAKE|{ts}||ORU^R01^ORU_R01|B{i:09d}|P|2.5",
                      f"PID|1||MRN{1000 + i % 500}^^^CARELAKE^MR||Doe^Jane||19500101|F",
                      f"PV1|1|I|6N^{i % 30}^1^GENERAL||||||||||||||||V{i % 700:07d}^^^CARELAKE^VN",
                      f"OBR|1|P{i}|F{i}|vitals^Vital signs|||{ts}", *obx]) + "\r"


def fhir_line(i: int) -> str:
    code, unit, low, span = VITALS[i % len(VITALS)]
    return json.dumps({"resourceType": "Observation", "id": f"obs-{i}", "meta": {"versionId": "1"},
                       "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                       "subject": {"reference": f"Patient/pat-{i % 500}"},
                       "effectiveDateTime": f"2026-01-05T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",
                       "valueQuantity": {"value": low + (i * 13) % span, "unit": unit,
                                         "system": "http://unitsofmeasure.org", "code": unit}},
                      separators=(",", ":")) + "\n"


def write_input(feed: str, records: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, records, PER_FILE[feed]):
        n = min(PER_FILE[feed], records - start)
        if feed == "devices":
            text, name = device_lines(start, n), f"part-{start:09d}.jsonl"
        elif feed == "hl7":
            text, name = "".join(oru(i) for i in range(start, start + n)), f"part-{start:09d}.hl7"
        else:
            text, name = "".join(fhir_line(i) for i in range(start, start + n)), f"part-{start:09d}.ndjson"
        path = folder / name
        path.write_text(text)
        files.append(path)
    return files


# --writes: who writes the batches' files (storage.driver_write_max_rows / _mb; see docs/architecture.md)
WRITES = {"auto": {}, "executors": {"storage.driver_write_max_rows": "0", "storage.driver_write_max_mb": "0"},
          "driver": {"storage.driver_write_max_rows": "1000000000", "storage.driver_write_max_mb": "1000000"}}


def end_to_end(feed: str, files: list[Path], spark, writes: str = "auto") -> float:
    from pipelines.jobs import load_registry
    from pipelines.landing import ingest
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store

    cfg = temp_config(Path(tempfile.mkdtemp(prefix="carelake-bench-silver-")), **WRITES[writes])
    store = open_store(cfg, spark)
    runner = Runner(cfg, spark, store, load_registry(cfg))
    t0 = time.perf_counter()
    ingest(cfg, files, feed)
    runner.run([BRONZE[feed], "silver.observations"], Trigger(available_now=True))
    return time.perf_counter() - t0


def parse_only(feed: str, files: list[Path], spark) -> float:
    from datetime import UTC, datetime

    from pyspark.sql import functions as F

    from pipelines.jobs import load_registry
    from pipelines.runner import LANDING_FILE_SCHEMA

    cfg = temp_config(Path(tempfile.mkdtemp(prefix="carelake-bench-parse-")))
    registry = load_registry(cfg)
    bronze_job, silver_job = registry.get(BRONZE[feed]), registry.get("silver.observations")
    t0 = time.perf_counter()
    landed = spark.read.format("binaryFile").schema(LANDING_FILE_SCHEMA).load([str(f) for f in files])
    rows = bronze_job.apply(landed, {"batch_id": 0, "ingest_batch_id": "bench", "processed_at": datetime.now(UTC)})
    changes = rows[bronze_job.name].withColumn("_change_type", F.lit("insert"))
    out = silver_job.apply(changes, {"batch_id": 0, "ingest_batch_id": "bench", "processed_at": datetime.now(UTC)})
    out.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--feed", choices=sorted(GOALS), required=True)
    ap.add_argument("--records", type=int)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--writes", choices=sorted(WRITES), default="auto",
                    help="auto: small batches from the driver, large ones by the executors (the default config)")
    a = ap.parse_args()
    records = a.records or DEFAULTS[a.feed]
    from pipelines.spark import create_spark

    # With --writes driver each micro-batch travels through the driver as Arrow on its way to delta-rs: give it room.
    cfg = temp_config(**{"spark.driver_memory": "6g"})
    spark = create_spark(cfg.spark)
    files = write_input(a.feed, records, Path(tempfile.mkdtemp(prefix="carelake-bench-input-")))
    parse_only(a.feed, files[:1], spark)  # warm the JVM and Python workers outside the timing
    e2e, parse = [], []
    for _ in range(a.runs):
        parse.append(records / parse_only(a.feed, files, spark))
        e2e.append(records / end_to_end(a.feed, files, spark, a.writes))
    unit = {"devices": "readings", "hl7": "messages", "fhir": "resources"}[a.feed]
    emit({"benchmark": "silver_observations", "feed": a.feed, "records": records, "runs": a.runs, "writes": a.writes,
          "cores": os.cpu_count(), f"end_to_end_{unit}_per_s_median": round(median(e2e)),
          f"parse_only_{unit}_per_s_median": round(median(parse)),
          "ratio_end_to_end_to_parse_only": round(median([e / p for e, p in zip(e2e, parse, strict=True)]), 3),
          "end_to_end_runs": [round(x) for x in e2e], "parse_only_runs": [round(x) for x in parse],
          "goal_per_s": GOALS[a.feed]})
    spark.stop()


if __name__ == "__main__":
    main()
