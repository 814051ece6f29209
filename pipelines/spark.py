"""The one SparkSession factory: configured once from SparkConfig and passed in, never global."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import SparkConfig
from pipelines.errors import CarelakeError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_LOG4J = Path(__file__).with_name("log4j2.properties")


def _under_spark_submit() -> bool:
    """spark-submit starts the JVM first and hands Python the gateway; its master must win."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _check_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise CarelakeError(
            "Java 17 or newer is required for Spark and was not found: install openjdk-17-jre-headless"
            " (Debian/Ubuntu) or openjdk@17 (Homebrew), or set JAVA_HOME"
        )


def session_settings(cfg: SparkConfig, tmp_dir: str | None = None) -> dict[str, str]:
    """The spark.* settings carelake applies, before cfg.conf's pass-through overrides.

    `tmp_dir`: the driver JVM's java.io.tmpdir (Spark's scratch space and its per-session artifact folder).
    """
    java_opts = f"-Dlog4j.configurationFile=file:{_LOG4J} -Dlog4j2.level={cfg.log_level}"
    driver_opts = f"{java_opts} -Djava.io.tmpdir={tmp_dir}" if tmp_dir else java_opts
    settings = {
        "spark.app.name": cfg.app_name,
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.default.parallelism": str(cfg.shuffle_partitions),
        "spark.ui.enabled": str(cfg.ui).lower(),
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.streaming.stopGracefullyOnShutdown": "true",
        # carelake's Python change-feed source (pipelines/deltasource.py) has no native available-now support;
        # without this wrapper Spark 4.0 silently runs ONE batch, so after a crash `--available-now` replays the
        # interrupted batch and stops, leaving later upstream versions for the next run (SPARK-45178).
        "spark.sql.streaming.triggerAvailableNowWrapper.enabled": "true",
        # Spark's own advice for HotSpot: a whole-stage method over 8,000 bytes of bytecode is never JIT-compiled
        # and runs interpreted; above this limit Spark falls back to per-operator code instead. The device
        # projection (silver.observations) generates ~10 KB: 500k rows 29.8 s at the default 65535, 17.0 s here.
        "spark.sql.codegen.hugeMethodLimit": "8000",
        # Generated classes are cached by their source; at the default 100 entries the jobs of one `run all` (four
        # streaming plans, gold's wide projections) evict each other, and a score batch recompiled 10-27 classes
        # (0.4-0.9 s) every time; with room for them all it compiles about one per batch.
        "spark.sql.codegen.cache.maxEntries": "2000",
        # The score job's per-person state (gold.scoring): RocksDB keeps it off the JVM heap, and with changelog
        # checkpointing a batch writes what it changed instead of a snapshot of every state; a query with state
        # runs no empty batches between data (they cost a state-store round trip and change nothing here).
        "spark.sql.streaming.stateStore.providerClass":
            "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider",
        "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled": "true",
        "spark.sql.streaming.noDataMicroBatches.enabled": "false",
        "spark.driver.extraJavaOptions": driver_opts,
        "spark.executor.extraJavaOptions": java_opts,
    }
    if not _under_spark_submit():
        settings["spark.master"] = cfg.master
        settings["spark.driver.memory"] = cfg.driver_memory
    return {**settings, **dict(cfg.conf)}


def create_spark(cfg: SparkConfig) -> SparkSession:
    """Build (or join, under spark-submit) the SparkSession carelake runs on."""
    # Workers must run this interpreter: the one with carelake and its pinned packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if not _under_spark_submit():
        _check_java()
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    for key, value in session_settings(cfg, None if _under_spark_submit() else _scratch_dir()).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark


def _scratch_dir() -> str:
    """A temporary folder of this process for the driver JVM, removed at exit.

    Spark 4 creates an `artifacts-<uuid>` folder in java.io.tmpdir for every session and never removes it; in
    the system temp folder they pile up, one per run. The folder also holds the working copies of the RocksDB
    state stores a stateful query opened, which the JVM closes in its shutdown hooks; the JVM starts those only
    when it reads the end of its stdin, i.e. after this process is gone. So the removal, registered before the JVM
    starts and thus run last at exit, first ends such a JVM (closes its stdin) and waits for it: removed earlier,
    RocksDB logs "MANIFEST verification on Close" errors for every open store. Without stores nothing waits. A
    process killed with -9 leaves its folder behind, named carelake-spark-*.
    """
    folder = tempfile.mkdtemp(prefix="carelake-spark-")
    atexit.register(_remove_after_jvm, folder)
    return folder


def _remove_after_jvm(folder: str, timeout_s: float = 60.0) -> None:
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)  # noqa: SLF001 - the JVM's Popen, set by launch_gateway
    stores = next(Path(folder).glob("*/StateStoreId*"), None)
    if stores is not None and proc is not None and proc.poll() is None:
        try:
            if SparkContext._active_spark_context is not None:  # noqa: SLF001
                # Stopped here first, its accumulator server is closed before the JVM's end would cut it off
                # (an EOFError traceback from the server's thread).
                SparkContext._active_spark_context.stop()  # noqa: SLF001
            if proc.stdin is not None:
                proc.stdin.close()  # PythonGatewayServer exits on EOF, running Spark's shutdown hooks
            proc.wait(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - at exit, a JVM that will not end must not keep the folder forever
            pass
    shutil.rmtree(folder, True)


def jvm_has_class(spark: SparkSession, class_name: str) -> bool:
    """True when the running JVM can load `class_name` (e.g. io.delta.tables.DeltaTable)."""
    try:
        spark._jvm.java.lang.Class.forName(class_name)  # noqa: SLF001 - py4j is the only way to ask the JVM
        return True
    except Exception:  # py4j raises Py4JJavaError wrapping ClassNotFoundException
        return False
