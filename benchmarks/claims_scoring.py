"""Claims scoring, available-now: silver.claims + silver.claim_lines -> gold.claims_fraud_scores, claim lines/s.

Input, per size in `--lines` (default 1,000,000,2,000,000,4,000,000): claim lines written straight into a temp
lakehouse with the table store (the simulator writes ~200 lines/s of claims; millions come from this vectorized
generator instead), shaped like the simulator's: `--lines-per-claim` (default 10) lines a claim, hospital E/M,
critical care, labs and imaging codes, one claim a member, 1,000 rendering providers billing 3 claims a day each in
service-date order (CLAIMS_PER_DAY), every member linked to a patient with one stay (silver.patients,
silver.encounters) so the bill-against-the-chart rule joins a real chart.

Measured: `carelake run gold.claims_fraud_scores --available-now` in process (the Runner as the CLI builds it): every
rule over every current line, features, the score rows MERGEd into gold (the first run: every claim is new). Then
an increment of `--increment` (default 1 %) more claims (new members, the same providers, the next days) is appended to
silver and scored by the next available-now run, the operational cadence: its cost should follow the increment,
not the history. No model is registered (the model's per-claim predict is measured by models' own tests). One JSON
line: per size lines, claims, seconds, lines/s, the increment's lines, seconds and the claims it rescored (its own and
those sharing a member or a provider-day with them), and the growth of seconds per line from the smallest size to
each larger one (1.0 = linear). With --runs N each run scores the whole table again
from scratch and adds its own increment (so run k scores k-1 increments more).

Run: .venv/bin/python benchmarks/claims_scoring.py [--lines 1000000,2000000,4000000] [--runs 1] [--driver-memory 1g]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

from _common import available_now, emit, median, temp_config

CODES = ("99223", "99232", "99233", "99232", "99291", "85025", "83605", "82565", "71046", "99239")
T0 = date(2026, 1, 5)
PROVIDERS = 1_000
# Claims arrive in service-date order, 3 a day for each provider: a larger history is a longer one (1M lines are
# 33 days, 10M 333) at the same density (~12 claims on a provider-day, the 10 lines spanning 4 days), and an
# increment is the next claims (its provider-days the newest ones), as on a payer's feed.
CLAIMS_PER_DAY = 3 * PROVIDERS


def _arrow(schema, columns: dict, n: int):
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow = to_arrow_schema(schema)
    return pa.Table.from_arrays([columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                                 for f in arrow], schema=arrow)


def silver_batch(first_claim: int, claims: int, per_claim: int):
    """(claims, lines, patients, encounters) Arrow tables for claims first_claim .. first_claim + claims."""
    import numpy as np
    import pyarrow as pa

    from silver.claims import LINES_SCHEMA, SCHEMA
    from silver.encounters import SCHEMA as ENCOUNTERS_SCHEMA
    from silver.patients import SCHEMA as PATIENTS_SCHEMA

    now = pa.array(np.full(claims, int(time.time() * 1e6)), pa.timestamp("us", tz="UTC"))
    c = np.arange(first_claim, first_claim + claims)
    key = pa.array([f"clm-{i:010d}" for i in c])
    member = pa.array([f"mem-{i:010d}" for i in c])
    patient = pa.array([f"pat-{i:010d}" for i in c])
    start = np.datetime64(T0) + (c // CLAIMS_PER_DAY).astype("timedelta64[D]")
    provider = pa.array([f"1{(3000 + p):08d}0" for p in c % PROVIDERS])
    claim_cols = {"claim_key": key, "claim_id": key, "status": pa.array(["active"] * claims),
                  "claim_type": pa.array(["institutional"] * claims), "billing_provider_key": provider,
                  "billing_npi": provider, "member_key": member, "patient_key": patient,
                  "service_from": pa.array(start), "service_to": pa.array(start + per_claim // 3),
                  "billed_amount": pa.array(np.round(np.full(claims, 1234.5), 2)), "part2": pa.array([False] * claims),
                  "claim_version": pa.array(["2026-01-20|1|bench"] * claims), "ingested_at": now}
    n = claims * per_claim
    line_claim = np.repeat(np.arange(claims), per_claim)
    number = np.tile(np.arange(1, per_claim + 1), claims)
    day = start[line_claim] + ((number - 1) // 3).astype("timedelta64[D]")
    line_now = pa.array(np.full(n, int(time.time() * 1e6)), pa.timestamp("us", tz="UTC"))
    line_cols = {"claim_key": key.take(pa.array(line_claim)), "line_number": pa.array(number.astype(np.int32)),
                 "line_status": pa.array(["active"] * n),
                 "procedure_code": pa.array([CODES[(i - 1) % len(CODES)] for i in number]),
                 "units": pa.array(np.ones(n)), "service_from": pa.array(day), "service_to": pa.array(day),
                 "rendering_npi": provider.take(pa.array(line_claim)), "claim_version": pa.array(["v"] * n),
                 "ingested_at": line_now}
    stay_from = (start.astype("datetime64[s]").astype(np.int64) * 1_000_000)
    patient_cols = {"patient_key": patient, "identity_kind": pa.array(["patient"] * claims), "ingested_at": now}
    encounter_cols = {"encounter_key": pa.array([f"enc-{i:010d}" for i in c]),
                      "identity_kind": pa.array(["encounter"] * claims), "patient_key": patient,
                      "status": pa.array(["finished"] * claims),
                      "admitted_at": pa.array(stay_from, pa.timestamp("us", tz="UTC")),
                      "discharged_at": pa.array(stay_from + per_claim // 3 * 86_400_000_000 + 1,
                                                pa.timestamp("us", tz="UTC")),
                      "ingested_at": now}
    return (_arrow(SCHEMA, claim_cols, claims), _arrow(LINES_SCHEMA, line_cols, n),
            _arrow(PATIENTS_SCHEMA, patient_cols, claims), _arrow(ENCOUNTERS_SCHEMA, encounter_cols, claims))


def write_silver(cfg, lines: int, per_claim: int, chunk_claims: int = 100_000, first_claim: int = 0) -> float:
    from pipelines.store.deltars import DeltaRsStore

    store = DeltaRsStore(cfg)
    t0 = time.perf_counter()
    claims = lines // per_claim
    for first in range(first_claim, first_claim + claims, chunk_claims):
        tables = silver_batch(first, min(chunk_claims, first_claim + claims - first), per_claim)
        for name, table in zip(("silver.claims", "silver.claim_lines", "silver.patients", "silver.encounters"),
                               tables, strict=True):
            store.append(name, table)
    return time.perf_counter() - t0


def score(cfg, spark, first_claim: int, increment: int, per_claim: int) -> tuple[float, int, float, int]:
    """(seconds of the whole run, rows scored, seconds of the increment's run, claims the increment rescored) from an
    empty gold table."""
    import pyarrow.compute as pc

    from gold.claims_fraud import SCORES

    for path in (cfg.path("gold"), cfg.path("_checkpoints"), cfg.path("_metrics")):
        shutil.rmtree(path, ignore_errors=True)
    seconds, store = available_now(cfg, spark, SCORES)
    rows = store.row_count(SCORES)
    write_silver(cfg, increment * per_claim, per_claim, first_claim=first_claim)
    added = available_now(cfg, spark, SCORES)[0]
    at = store.read_arrow(SCORES, columns=["scored_at"]).column("scored_at")
    return seconds, rows, added, pc.sum(pc.equal(at, pc.max(at))).as_py()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", default="1000000,2000000,4000000", help="comma-separated sizes in claim lines")
    ap.add_argument("--lines-per-claim", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1, help="scoring runs per size (the median is reported)")
    ap.add_argument("--increment", type=float, default=0.01, help="share of claims added and scored after each run")
    ap.add_argument("--driver-memory", default="1g", help="the Spark JVM's heap (local mode: driver and executors); "
                    "1g is the test overlay's; 10M lines want more (4g)")
    ap.add_argument("--shuffle-partitions", default="2", help="spark.shuffle_partitions (the test overlay's 2 ran "
                    "out of execution memory at 10M lines with 4g: a task's hash aggregate of 5M lines; 16 there)")
    a = ap.parse_args()
    from pipelines.spark import create_spark

    sizes = [int(s) for s in a.lines.split(",")]
    figures: dict = {"sizes": {}, "cores": os.cpu_count(), "load_average_1m_start": os.getloadavg()[0],
                     "driver_memory": a.driver_memory, "shuffle_partitions": a.shuffle_partitions}
    spark = None
    for size in sizes:
        root = Path(tempfile.mkdtemp(prefix="carelake-bench-claims-"))
        cfg = temp_config(root, **{"claims.exclusion_list": "\"\"", "spark.driver_memory": a.driver_memory,
                                   "spark.shuffle_partitions": a.shuffle_partitions})
        spark = spark or create_spark(cfg.spark)
        write_s = write_silver(cfg, size, a.lines_per_claim)
        claims, step = size // a.lines_per_claim, max(1, round(size // a.lines_per_claim * a.increment))
        runs = [score(cfg, spark, claims + k * step, step, a.lines_per_claim) for k in range(a.runs)]
        seconds, added = median([r[0] for r in runs]), median([r[2] for r in runs])
        figures["sizes"][str(size)] = {"lines": size, "claims": runs[0][1], "write_silver_s": round(write_s, 1),
                                       "score_s": round(seconds, 1), "lines_per_s": round(size / seconds),
                                       "runs_s": [round(r[0], 1) for r in runs],
                                       "increment_lines": step * a.lines_per_claim, "increment_s": round(added, 1),
                                       "increment_runs_s": [round(r[2], 1) for r in runs],
                                       "increment_rescored_claims": [r[3] for r in runs]}
        shutil.rmtree(root, ignore_errors=True)
    first = figures["sizes"][str(sizes[0])]
    for entry in figures["sizes"].values():
        entry["cost_per_line_vs_smallest"] = round((entry["score_s"] / entry["lines"])
                                                   / (first["score_s"] / first["lines"]), 2)
    figures["load_average_1m_end"] = os.getloadavg()[0]
    figures["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    emit(figures)


if __name__ == "__main__":
    main()
