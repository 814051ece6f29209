"""Table store: Delta tables by name, on delta-rs (embedded default) or delta-spark (native)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.config import Config
from pipelines.errors import ConfigError
from pipelines.store.base import CommitInfo, MergeSpec, TableInfo, TableRef, TableStore, Txn, WriteResult

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

DELTA_SPARK_CLASS = "io.delta.tables.DeltaTable"

__all__ = [
    "CommitInfo", "MergeSpec", "TableInfo", "TableRef", "TableStore", "Txn", "WriteResult",
    "open_store", "resolve_engine",
]


def resolve_engine(cfg: Config, spark: SparkSession | None) -> str:
    """storage.engine with `auto` decided: delta-spark when the JVM has the Delta classes, else delta-rs."""
    engine = cfg.storage.engine
    if engine != "auto":
        return engine
    if spark is None:
        return "delta-rs"
    from pipelines.spark import jvm_has_class

    return "delta-spark" if jvm_has_class(spark, DELTA_SPARK_CLASS) else "delta-rs"


def open_store(cfg: Config, spark: SparkSession | None = None) -> TableStore:
    """The configured table store. Without a SparkSession only delta-rs can be used (Arrow in, Arrow out)."""
    engine = resolve_engine(cfg, spark)
    if engine == "delta-spark":
        from pipelines.spark import jvm_has_class

        if spark is None or not jvm_has_class(spark, DELTA_SPARK_CLASS):
            raise ConfigError(
                "storage.engine is delta-spark but the JVM has no Delta classes: start Spark with the Delta"
                " jars (spark-submit --packages io.delta:delta-spark_2.13:4.0.0) or set storage.engine: delta-rs"
            )
        from pipelines.store.deltaspark import DeltaSparkStore

        return DeltaSparkStore(cfg, spark)
    from pipelines.store.deltars import DeltaRsStore

    return DeltaRsStore(cfg, spark)
