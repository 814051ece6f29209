"""X12 837P -> bronze.claim_files -> silver.claim_lines, available-now: lines/s end to end and the parse-only limit.

Input: 837P files written here (a billing provider, subscribers, claims of `--lines-per-claim` service lines with
NPI-valid providers, ICD-10 diagnoses by pointer, CPT codes with modifiers), `--claims-per-file` claims a file in one
interchange each. End to end = `carelake ingest --feed x12` of the files, then the bronze job and the silver claims job
(pyx12 reading, checks, the in-batch fold, validation, the MERGEs of silver.claims, .claim_lines, .providers,
.members) via the runner, committed to Delta. Parse-only = the same files through the same bronze and silver
transforms (pyx12 reading, checks, the fold's shuffle) into Spark's no-op sink: no Delta writes, no merge, no
validation. Both in the same run, medians of `--runs`.

Run: .venv/bin/python benchmarks/claims_x12.py [--lines 200000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import emit, median, temp_config

GOAL = 20_000
CPT = ("99213", "99214", "87070", "85025", "93000", "71046", "80053", "36415")


def npi(body: str) -> str:
    """A 10-digit NPI: 9 digits and the Luhn check digit with the 80840 prefix."""
    total = 0
    for i, ch in enumerate(reversed("80840" + body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str((10 - total % 10) % 10)


def claim(n: int, hl: int, lines: int) -> list[str]:
    segs = [f"HL*{hl}*1*22*0", "SBR*P*18*******CI", f"NM1*IL*1*DOE*JANE{n % 997}****MI*M{n % 5000:06d}",
            f"DMG*D8*19{50 + n % 50:02d}0101*{'F' if n % 2 else 'M'}", "NM1*PR*2*ACME HEALTH*****PI*PAYER1",
            f"CLM*C{n:09d}*{lines * 50}.00***11:B:1*Y*A*Y*Y", f"REF*EA*MRN{n % 5000:06d}",
            "HI*ABK:E119*ABF:I10*ABF:J449*ABF:R0602", f"NM1*82*1*SMITH*ANN****XX*{npi(f'1{n % 50:08d}')}"]
    for k in range(1, lines + 1):
        segs += [f"LX*{k}", f"SV1*HC:{CPT[(n + k) % len(CPT)]}:25*50.00*UN*1***1:2", "DTP*472*D8*20261130"]
    return segs


def interchange(control: int, start: int, claims: int, lines: int) -> str:
    body = ["BHT*0019*00*B1*20261201*1200*CH", "NM1*41*2*SUBMITTER*****46*S1", "NM1*40*2*PAYER*****46*P1",
            "HL*1**20*1", f"NM1*85*2*CLINIC*****XX*{npi('123456789')}", "N4*TOWN*ST*12345", "REF*EI*123456789"]
    for hl, n in enumerate(range(start, start + claims), start=2):
        body += claim(n, hl, lines)
    isa = ["ISA", "00", " " * 10, "00", " " * 10, "ZZ", "SENDER".ljust(15), "ZZ", "RECEIVER".ljust(15), "261201",
           "1200", "^", "00501", f"{control:09d}", "0", "P", ":"]
    segs = [f"GS*HC*SENDER*RECEIVER*20261201*1200*{control}*X*005010X222A1", "ST*837*0001*005010X222A1", *body,
            f"SE*{len(body) + 2}*0001", f"GE*1*{control}", f"IEA*1*{control:09d}"]
    return "*".join(isa) + "~\n" + "~\n".join(segs) + "~\n"


def write_input(total_lines: int, per_claim: int, per_file: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    claims, files = total_lines // per_claim, []
    for start in range(0, claims, per_file):
        path = folder / f"batch-{start:09d}.837"
        path.write_text(interchange(start // per_file + 1, start, min(per_file, claims - start), per_claim))
        files.append(path)
    return files


def end_to_end(files: list[Path], spark, expected_lines: int) -> float:
    from pipelines.jobs import load_registry
    from pipelines.landing import ingest
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store

    cfg = temp_config(Path(tempfile.mkdtemp(prefix="carelake-bench-claims-")))
    runner = Runner(cfg, spark, open_store(cfg, spark), load_registry(cfg))
    t0 = time.perf_counter()
    ingest(cfg, files, "x12")
    runner.run(["bronze.claim_files", "silver.claims"], Trigger(available_now=True))
    seconds = time.perf_counter() - t0
    store = open_store(cfg, spark)
    written, quarantined = store.row_count("silver.claim_lines"), store.row_count("silver.quarantine")
    if written != expected_lines or quarantined:
        raise SystemExit(f"the run wrote {written:,} claim lines (expected {expected_lines:,}) and quarantined "
                         f"{quarantined:,} rows: the input or the pipeline is wrong, the figure would mean nothing")
    return seconds


def parse_only(files: list[Path], spark) -> float:
    from datetime import UTC, datetime

    from pyspark.sql import functions as F

    from pipelines.jobs import load_registry
    from pipelines.runner import LANDING_FILE_SCHEMA

    cfg = temp_config(Path(tempfile.mkdtemp(prefix="carelake-bench-claims-parse-")))
    registry = load_registry(cfg)
    bronze_job, silver_job = registry.get("bronze.claim_files"), registry.get("silver.claims")
    batch = {"batch_id": 0, "ingest_batch_id": "bench", "processed_at": datetime.now(UTC)}
    t0 = time.perf_counter()
    landed = spark.read.format("binaryFile").schema(LANDING_FILE_SCHEMA).load([str(f) for f in files])
    landed = landed.withColumn("path", F.concat(F.lit("file:/bench/landing/x12/"), F.col("path")))
    rows = bronze_job.apply(landed, batch)[bronze_job.name].withColumn("_change_type", F.lit("insert"))
    silver_job.apply(rows, batch).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=200_000, help="claim lines in all (default 200,000)")
    ap.add_argument("--lines-per-claim", type=int, default=5)
    ap.add_argument("--claims-per-file", type=int, default=2_500)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    from pipelines.spark import create_spark

    spark = create_spark(temp_config(**{"spark.driver_memory": "4g"}).spark)
    files = write_input(a.lines, a.lines_per_claim, a.claims_per_file,
                        Path(tempfile.mkdtemp(prefix="carelake-bench-x12-")))
    lines = a.lines // a.lines_per_claim * a.lines_per_claim
    parse_only(files[:1], spark)  # warm the JVM and Python workers outside the timing
    e2e, parse = [], []
    for _ in range(a.runs):
        parse.append(lines / parse_only(files, spark))
        e2e.append(lines / end_to_end(files, spark, lines))
    emit({"benchmark": "claims_x12", "lines": lines, "claims": lines // a.lines_per_claim, "files": len(files),
          "runs": a.runs, "cores": os.cpu_count(), "end_to_end_lines_per_s_median": round(median(e2e)),
          "parse_only_lines_per_s_median": round(median(parse)),
          "ratio_end_to_end_to_parse_only": round(median([e / p for e, p in zip(e2e, parse, strict=True)]), 3),
          "end_to_end_runs": [round(x) for x in e2e], "parse_only_runs": [round(x) for x in parse],
          "goal_lines_per_s": GOAL})
    spark.stop()


if __name__ == "__main__":
    main()
