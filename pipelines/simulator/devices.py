"""ICU bedside-monitor numerics at scale: Spark generates, formats and (in its Python workers) writes JSON lines.

Work is split by event hour (a partition holds whole hours, so no shuffle): each (hour x ICU stay) row explodes
into monitor ticks, each tick into measures; values come from trajectory.py, dirt from a second hash. Rows are
sorted inside their partition by delivery file and time, and each partition writes its own files straight from
Arrow buffers. Files are per delivery hour; readings delivered in a later hour than they happened go to a
`-backlog-<event hour>` file, so every file has exactly one writer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.simulator.clinical import BY_KEY, CODE_NO, MEASURES, MONITOR_KEYS
from pipelines.simulator.observations import encounter_params
from pipelines.simulator.params import SimParams
from pipelines.simulator.population import Census, icu_cadence_s

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame, SparkSession

ON_TIME = 999_999
RESEND_DELAY_S = 30
_STAY_SCHEMA = ("device_no int, device_id string, patient_mrn string, visit_no long, start_s long, end_s long, "
                "cadence_s long, bases array<double>, kind_no int, onset_s double, ramp_s double, "
                "recovery_start_s double, recovery_s double, gains array<double>, episode array<double>")
_RESULT_SCHEMA = "file string, line long, info string, code_no int, count long"
_ACVPU_LETTERS = ("A", "C", "V", "P", "U")


@dataclass(frozen=True)
class DeviceOutput:
    """What the device writer reports: lines per (file, measure) and one row per injected dirt."""

    lines: dict[tuple[str, str], int]        # (file, loinc) -> lines written
    dirt: list[tuple[str, int, str]]         # (file, line number, "kinds|device|mrn|time|loinc")


def icu_stays(census: Census, params: SimParams) -> list[tuple]:
    """One row per ICU stay (split at MRN merges) inside the window, with its trajectory parameters."""
    rows = []
    for enc in census.active:
        p = encounter_params(enc, params.seed)
        for stay in enc.stays:
            start, end = max(stay.start_s, 0), min(stay.end_s, params.window_s)
            if stay.icu and start < end:
                rows.append((int(stay.bed), stay.device_id, stay.mrn, enc.visit_no, start, end,
                             icu_cadence_s(enc, params), *p[1:]))
    return rows


def file_name(key: int, start: datetime) -> str:
    """devices/<delivery hour>-icu-monitors.jsonl, or ...-backlog-<event hour>.jsonl for late deliveries."""
    delivered, event = divmod(key, 1_000_000)

    def stamp(hour: int) -> str:
        return (start + timedelta(hours=hour)).strftime("%Y%m%dT%H%MZ")

    if event == ON_TIME:
        return f"{stamp(delivered)}-icu-monitors.jsonl"
    return f"{stamp(delivered)}-icu-monitors-backlog-{stamp(event)}.jsonl"


def _lit_strings(values) -> Column:
    from pyspark.sql import functions as F

    return F.array(*[F.lit(v) for v in values])


def readings_frame(spark: SparkSession, stays: list[tuple], params: SimParams) -> DataFrame:
    """Every monitor reading (plus duplicate copies) with its delivery file key, formatted line and dirt label."""
    from pyspark.sql import functions as F

    from pipelines.simulator.trajectory import measure_value, uniform

    c = F.col
    hours = spark.range(0, params.hours, numPartitions=min(params.partitions, params.hours)).select(
        c("id").alias("hour"))
    beds = spark.createDataFrame(stays, _STAY_SCHEMA)
    h0, h1 = c("hour") * 3600, (c("hour") + 1) * 3600
    ticks = (hours.crossJoin(F.broadcast(beds))
             .where((c("start_s") < h1) & (c("end_s") > h0))
             .withColumn("first", c("start_s") + F.ceil((F.greatest(c("start_s"), h0) - c("start_s"))
                                                          / c("cadence_s")).cast("long") * c("cadence_s"))
             .withColumn("last", F.least(c("end_s"), h1) - 1)
             .where(c("first") <= c("last"))
             .withColumn("t", F.explode(F.sequence(c("first"), c("last"), c("cadence_s"))))
             .withColumn("time", F.date_format(F.timestamp_seconds(F.lit(params.start_epoch) + c("t")),
                                               "yyyy-MM-dd'T'HH:mm:ss.SSS'Z'")))
    monitor = [CODE_NO[k] for k in MONITOR_KEYS]
    hourly = F.when((c("t") - c("start_s")) % 3600 < c("cadence_s"), F.array(*map(F.lit, monitor + [CODE_NO["acvpu"]])))
    readings = ticks.withColumn("code_no", F.explode(hourly.otherwise(F.array(*map(F.lit, monitor)))))
    value = measure_value(seed=params.seed, start_hour=params.start.hour + params.start.minute / 60,
                          visit_no=c("visit_no"), t=c("t"), code_no=c("code_no"),
                          base=F.element_at(c("bases"), c("code_no") + 1), kind_no=c("kind_no"),
                          onset_s=c("onset_s"), ramp_s=c("ramp_s"), recovery_start_s=c("recovery_start_s"),
                          recovery_s=c("recovery_s"), gains=c("gains"), episode=c("episode"))
    h = F.xxhash64(F.lit(params.seed), c("visit_no"), c("t"), c("code_no"), F.lit("dirt"))
    return (readings.withColumn("value", value).withColumn("h", h)
            .transform(functools.partial(_with_dirt, params=params, uniform=uniform))
            .sortWithinPartitions("file_key", "delivered_s", "device_no", "code_no", "copy")
            .select("file_key", _line().alias("line"), "code_no", _dirt_label().alias("dirt")))


def _with_dirt(df: DataFrame, *, params: SimParams, uniform) -> DataFrame:
    """Decide each reading's dirt from its hash: value dirt (exclusive), late delivery, duplicate copy."""
    from pyspark.sql import functions as F

    c = F.col
    rates = params.dirt
    numeric = c("code_no") != CODE_NO["acvpu"]
    u = uniform(c("h"), 0)
    m, uv, mal = rates["missing_value"], rates["unit_variant"], rates["malformed"]
    has_variant = c("code_no").isin(CODE_NO["temp"], CODE_NO["fio2"])
    late_h = F.shiftrightunsigned(c("h"), 60).bitwiseAND(3) + 1
    df = (df.withColumn("missing", numeric & (u < m))
          .withColumn("variant", has_variant & (u >= m) & (u < m + uv))
          .withColumn("malformed", numeric & (u >= m + uv) & (u < m + uv + mal))
          .withColumn("late", uniform(c("h"), 2) < rates["late"])
          .withColumn("copy", F.explode(F.when(uniform(c("h"), 1) < rates["duplicate"], F.array(F.lit(0), F.lit(1)))
                                        .otherwise(F.array(F.lit(0)))))
          .withColumn("delivered_s", c("t") + F.when(c("late"), late_h * 3600).otherwise(0)
                      + c("copy") * RESEND_DELAY_S))
    delivered_hour = F.floor(c("delivered_s") / 3600).cast("long")
    event = F.when(delivered_hour == c("hour"), F.lit(ON_TIME)).otherwise(c("hour"))
    return df.withColumn("file_key", delivered_hour * 1_000_000 + event)


def _line() -> Column:
    """The JSON line (newline included); ACVPU as value_text; malformed lines cut short."""
    from pyspark.sql import functions as F

    c = F.col
    loinc = F.element_at(_lit_strings([m.loinc for m in MEASURES]), c("code_no") + 1)
    unit = F.element_at(_lit_strings([m.unit for m in MEASURES]), c("code_no") + 1)
    is_temp, is_fio2 = c("code_no") == CODE_NO["temp"], c("code_no") == CODE_NO["fio2"]
    value = (F.when(c("missing"), F.lit("null"))
             .when(c("variant") & is_temp, F.round(c("value") * 9 / 5 + 32, 1).cast("string"))
             .when(c("variant") & is_fio2, F.round(c("value") / 100, 2).cast("string"))
             .otherwise(c("value").cast("string")))
    unit = F.when(c("variant") & is_temp, F.lit("[degF]")).when(c("variant") & is_fio2, F.lit("1")).otherwise(unit)
    letter = F.element_at(_lit_strings(_ACVPU_LETTERS),
                          F.least(F.greatest(F.round(c("value")), F.lit(0.0)), F.lit(4.0)).cast("int") + 1)
    head = F.concat(F.lit('{"device_id": "'), c("device_id"), F.lit('", "patient_mrn": "'), c("patient_mrn"),
                    F.lit('", "time": "'), c("time"), F.lit('", "code": "'), loinc, F.lit('", '))
    tail = F.when(c("code_no") == CODE_NO["acvpu"], F.concat(F.lit('"value_text": "'), letter, F.lit('"}'))) \
        .otherwise(F.concat(F.lit('"value": '), value, F.lit(', "unit": "'), unit, F.lit('"}')))
    line = F.concat(head, tail)
    return F.concat(F.when(c("malformed"), F.substring(line, 1, 64)).otherwise(line), F.lit("\n"))


def _dirt_label() -> Column:
    """'kinds|device|mrn|time|loinc' for a dirty line, null for a clean one."""
    from pyspark.sql import functions as F

    c = F.col
    kinds = F.concat_ws(",", F.when(c("copy") == 1, F.lit("duplicate")), F.when(c("late"), F.lit("late")),
                        F.when(c("missing"), F.lit("missing_value")), F.when(c("variant"), F.lit("unit_variant")),
                        F.when(c("malformed"), F.lit("malformed")))
    loinc = F.element_at(_lit_strings([m.loinc for m in MEASURES]), c("code_no") + 1)
    label = F.concat_ws("|", kinds, c("device_id"), c("patient_mrn"), c("time"), loinc)
    return F.when(kinds != "", label)


def write_partition(batches: Iterator[pa.RecordBatch], *, folder: str, start_iso: str) -> Iterator[pa.RecordBatch]:
    """Runs in a Spark Python worker: write this partition's files; yield line counts and dirt rows."""
    import numpy as np
    import pyarrow as pa

    start = datetime.fromisoformat(start_iso)
    state = {"key": None, "fh": None, "line": 0, "counts": np.zeros(len(MEASURES), dtype=np.int64), "dirt": []}

    def close() -> pa.RecordBatch | None:
        if state["fh"] is None:
            return None
        state["fh"].close()
        name = file_name(state["key"], start)
        codes = [i for i, n in enumerate(state["counts"]) if n]
        rows = [(name, 0, "_count", i, int(state["counts"][i])) for i in codes]
        rows += [(name, line, info, -1, 0) for line, info in state["dirt"]]
        state.update(fh=None, line=0, counts=np.zeros(len(MEASURES), dtype=np.int64), dirt=[])
        return pa.RecordBatch.from_arrays([pa.array(col) for col in zip(*rows, strict=True)],
                                          schema=_result_arrow_schema())

    for batch in batches:
        keys = batch.column(0).to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(keys)) + 1).tolist(), len(keys)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            if a == b:
                continue
            if keys[a] != state["key"] or state["fh"] is None:
                done = close()
                if done is not None:
                    yield done
                state["key"] = int(keys[a])
                state["fh"] = open(Path(folder) / file_name(state["key"], start), "wb")  # noqa: SIM115
            state["fh"].write(_string_bytes(batch.column(1).slice(a, b - a)))
            state["counts"] += np.bincount(batch.column(2).slice(a, b - a).to_numpy(), minlength=len(MEASURES))
            dirt = batch.column(3).slice(a, b - a)
            for i in np.flatnonzero(dirt.is_valid().to_numpy(zero_copy_only=False)).tolist():
                state["dirt"].append((state["line"] + i + 1, dirt[i].as_py()))
            state["line"] += b - a
    done = close()
    if done is not None:
        yield done


def _result_arrow_schema():
    import pyarrow as pa

    return pa.schema([("file", pa.string()), ("line", pa.int64()), ("info", pa.string()), ("code_no", pa.int32()),
                      ("count", pa.int64())])


def _string_bytes(arr) -> memoryview:
    """The UTF-8 bytes of a (sliced, null-free) Arrow string array, without copying."""
    import numpy as np

    width = np.int64 if str(arr.type) == "large_string" else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset:arr.offset + len(arr) + 1]
    return memoryview(arr.buffers()[2])[int(offsets[0]):int(offsets[-1])]


def write_devices(spark: SparkSession, census: Census, params: SimParams) -> DeviceOutput:
    """Generate and write every ICU monitor reading; returns per-file counts and the injected dirt."""
    folder = params.out / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    stays = icu_stays(census, params)
    if not stays:
        return DeviceOutput({}, [])
    frame = readings_frame(spark, stays, params)
    writer = functools.partial(write_partition, folder=str(folder), start_iso=params.start.astimezone(UTC).isoformat())
    previous = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "65536")
    try:
        result = frame.mapInArrow(writer, _RESULT_SCHEMA).toArrow().to_pydict()
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", previous)
    lines: dict[tuple[str, str], int] = {}
    dirt = []
    for name, line, info, code_no, count in zip(result["file"], result["line"], result["info"], result["code_no"],
                                                result["count"], strict=True):
        if info == "_count":
            lines[(name, MEASURES[code_no].loinc)] = count
        else:
            dirt.append((name, line, info))
    return DeviceOutput(lines, sorted(dirt))


def monitor_units() -> dict[str, str]:
    """LOINC -> UCUM unit of what the monitors send."""
    return {BY_KEY[k].loinc: BY_KEY[k].unit for k in (*MONITOR_KEYS, "acvpu")}
