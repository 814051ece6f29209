"""Table references in SQL become views; strings, quoted names and comments are left alone."""

from __future__ import annotations

from pipelines.sqlrefs import TableReference, rewrite


def test_plain_and_time_travel_references():
    sql, refs = rewrite("select * from silver.observations o join bronze.hl7_messages VERSION AS OF 3 b on 1=1")
    assert sql == "select * from `silver__observations` o join `bronze__hl7_messages__v3` b on 1=1"
    assert refs == [TableReference("silver.observations"), TableReference("bronze.hl7_messages", version=3)]


def test_timestamp_travel_and_case():
    sql, refs = rewrite("SELECT count(*) FROM Gold.Early_Warning_Scores timestamp as of '2026-11-21 03:00:00'")
    assert refs == [TableReference("gold.early_warning_scores", timestamp="2026-11-21 03:00:00")]
    assert "TIMESTAMP" not in sql.upper().split("FROM")[1]


def test_strings_comments_and_column_paths_untouched():
    sql, refs = rewrite("select 'silver.x' as s, t.gold.y -- bronze.z\nfrom ops.metrics /* silver.q */")
    assert refs == [TableReference("ops.metrics")]
    assert "'silver.x'" in sql and "t.gold.y" in sql and "-- bronze.z" in sql and "/* silver.q */" in sql
