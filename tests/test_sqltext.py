"""SQL text helpers: what Spark parses back is exactly the Python value (strings, doubles, names)."""

from __future__ import annotations

import math

import pytest

from pipelines import sqltext as sql

STRINGS = ["plain", "it's", "back\\slash", "\\'", "Patient/pt-1|x", "tab\there", "ünïcödé", ""]
DOUBLES = [0.5, 1e-9, 35.05, -0.0, 21.0, 1e300, 5e-324, math.inf, -math.inf]


def test_strings_and_doubles_parse_back_to_the_python_values(spark):
    row = spark.range(1).selectExpr(
        *[f"{sql.string(s)} AS s{i}" for i, s in enumerate(STRINGS)],
        *[f"{sql.double(x)} AS d{i}" for i, x in enumerate(DOUBLES)],
        f"{sql.double(math.nan)} AS nan",
    ).collect()[0]
    assert [row[f"s{i}"] for i in range(len(STRINGS))] == STRINGS
    assert [row[f"d{i}"] for i in range(len(DOUBLES))] == DOUBLES
    assert math.isnan(row["nan"])
    types = dict(spark.range(1).selectExpr(f"{sql.double(0.5)} AS x").dtypes)
    assert types == {"x": "double"}  # not decimal(1,1), which plain 0.5 would be


def test_names_with_backticks_and_casts(spark):
    from pyspark.sql.types import ArrayType, LongType, StringType, StructField

    df = spark.range(1).selectExpr("1 AS `odd``name`", "array('a') AS tags")
    assert df.selectExpr(f"{sql.name('odd`name')} + 1 AS y").collect()[0]["y"] == 2
    fields = [StructField("odd`name", LongType()), StructField("tags", ArrayType(StringType()))]
    cast = df.selectExpr(*sql.casts(fields))
    assert [(f.name, f.dataType) for f in cast.schema.fields] == [(f.name, f.dataType) for f in fields]


@pytest.mark.parametrize("values, text", [(["A", "it's"], "'A', 'it\\'s'"), ([], "")])
def test_strings_joins_literals(values, text):
    assert sql.strings(values) == text


def test_type_text_reads_back_as_the_same_type_under_strict_settings(spark):
    """Struct field names that are reserved words and timestamps survive the settings a site may turn on."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import (
        ArrayType,
        DoubleType,
        MapType,
        StringType,
        StructField,
        StructType,
        TimestampType,
    )

    t = StructType([StructField("table", StringType()), StructField("at", TimestampType()),
                    StructField("odd`name", ArrayType(StructType([StructField("select", DoubleType())]))),
                    StructField("by", MapType(StringType(), TimestampType()))])
    strict = {"spark.sql.ansi.enforceReservedKeywords": "true", "spark.sql.timestampType": "TIMESTAMP_NTZ"}
    before = {k: spark.conf.get(k) for k in strict}
    try:
        for k, v in strict.items():
            spark.conf.set(k, v)
        cast = spark.range(1).select(F.lit(None).cast(sql.type_text(t)).alias("c"))
        text = spark.range(1).selectExpr(f"CAST(NULL AS {sql.type_text(t)}) AS c")
        assert cast.schema["c"].dataType == t and text.schema["c"].dataType == t
        with pytest.raises(Exception, match="table"):  # what the plain simpleString gives
            spark.range(1).select(F.lit(None).cast(t.simpleString())).collect()
    finally:
        for k, v in before.items():
            spark.conf.set(k, v)
