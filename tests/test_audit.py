"""`carelake audit`: an alert walks back to the landing bytes it came from, verified; a tampered byte is a mismatch.

One tiny lakehouse for the module: an HL7 ORU (all seven NEWS2 inputs, NEWS2 6 -> a news2_medium alert) landed
as the gateway lands it (a segment, behind another message, so its offset is not 0), then bronze (fused with
silver.observations) and the score job.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bronze.records import FILE_MAGIC, SEGMENT_SUFFIX, encode_record
from tests.conftest import REPO, make_config

OBX = "OBX|{n}|{t}|{code}^{name}^LN||{value}|{unit}^{unit}^UCUM|||||F|||20261121100000+0000"
VITALS = [("9279-1", "RR", "22", "/min"), ("8867-4", "HR", "95", "/min"), ("59408-5", "SpO2", "95", "%"),
          ("3150-0", "FiO2", "21", "%"), ("8480-6", "SBP", "105", "mm[Hg]"), ("8310-5", "Temp", "38.5", "Cel")]


def oru(control_id: str, mrn: str) -> bytes:
    obx = [OBX.format(n=i + 1, t="NM", code=c, name=n, value=v, unit=u) for i, (c, n, v, u) in enumerate(VITALS)]
    obx.append("OBX|7|CWE|67775-7^Level of responsiveness^LN||A^Alert^ACVPU||||||F|||20261121100000+0000")
    return ("\r".join([
        f"MSH|^~\\&|WARD|GENERAL|CARELAKE|CARELAKE|20261121100100+0000||ORU^R01^ORU_R01|{control_id}|P|2.5",
        f"PID|1||{mrn}^^^CARELAKE^MR||Roe^Sam||19470312|M",
        f"PV1|1|I|6N^12^1^GENERAL||||||||||||||||V{mrn}^^^CARELAKE^VN",
        "OBR|1|P1|F1|vitals^Vital signs|||20261121100000+0000", *obx]) + "\r").encode()


def land_segment(folder: Path, bodies: list[bytes]) -> Path:
    """A sealed landing segment as the MLLP gateway writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    header = {"received_at": datetime.now(UTC).isoformat(), "peer": "10.0.0.5:40000", "feed": "hl7",
              "protocol": "mllp", "content_type": "x-application/hl7-v2+er7", "status": "accepted"}
    path = folder / f"20261121T100100000000Z-hl7-0123456789ab{SEGMENT_SUFFIX}"
    path.write_bytes(FILE_MAGIC + b"".join(encode_record(header, b) for b in bodies))
    return path


@pytest.fixture(scope="module")
def lake(tmp_path_factory, spark):
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store

    root = tmp_path_factory.mktemp("audit") / "lake"
    cfg = make_config(root)
    # The first message is well (no alert); the second raises the alert.
    segment = land_segment(cfg.path("landing", "hl7"), [oru("A-0", "MRN3000").replace(b"|22|", b"|16|"),
                                                         oru("A-1", "MRN3001")])
    store = open_store(cfg, spark)
    registry = load_registry(cfg)
    names = [j.name for j in registry.order(["bronze.hl7_messages", "gold.early_warning_scores"])]
    Runner(cfg, spark, store, registry).run(names, Trigger(available_now=True))
    return cfg, store, segment


def cli(cfg, *args: str) -> int:
    from pipelines.cli import main

    return main(["--root", str(cfg.root), "--env", "test", "--conf-dir", str(REPO / "conf"), *args])


def the_alert(store) -> dict:
    (alert,) = store.read_arrow("gold.deterioration_alerts").to_pylist()
    return alert


def test_explain_walks_an_alert_back_to_the_landing_bytes_and_verifies_them(lake, capsys):
    cfg, store, segment = lake
    alert = the_alert(store)
    assert cli(cfg, "audit", "explain", alert["alert_id"], "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verdict"] == "verified" and r["alert"]["alert_id"] == alert["alert_id"]
    assert r["score"]["scored_at"] == "2026-11-21T10:00:00+00:00" and r["score"]["news2_score"] == 6
    assert r["code_version"] == "0.1.0" and r["model_version"] is None  # no model registered in this lake
    assert r["tables_read"]["silver.observations"] == r["score"]["silver_version"]
    obs = r["observations"]
    assert len(obs) == 7 and {o["observation_id"] for o in obs} == set(alert["observation_ids"])
    assert {o["source_id"].split("#")[0] for o in obs} == {"A-1"}  # MSH-10 of the second message
    # Every observation came from the second message of the segment: its exact bytes, at its offset.
    body = oru("A-1", "MRN3001")
    data = segment.read_bytes()
    offset = data.index(body)
    assert offset > len(FILE_MAGIC) + len(oru("A-0", "MRN3000"))
    for o in obs:
        assert (o["landing"]["file"], o["landing"]["offset"], o["landing"]["bytes"]) == (str(segment), offset,
                                                                                        len(body))
        assert o["landing"]["status"] == "verified" and o["bronze"]["table"] == "bronze.hl7_messages"
    import hashlib

    assert {o["landing"]["sha256_read"] for o in obs} == {hashlib.sha256(body).hexdigest()}
    # The same chain by the score row's key, as text; and both lookups are in ops.audit_log.
    key = f"{alert['patient_key']}@2026-11-21T10:00:00Z"
    assert cli(cfg, "audit", "explain", key) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"audit explain {alert['patient_key']}@2026-11-21T10:00:00+00:00: verified")
    assert text.count(f"offset {offset}") == 7 and "MISMATCH" not in text
    log = [e for e in store.read_arrow("ops.audit_log").to_pylist() if e["action"] == "explain"]
    assert {(e["outcome"], e["detail"]) for e in log} >= {("allowed", "verified")}


def test_a_tampered_landing_byte_is_reported_as_a_mismatch(lake, capsys):
    cfg, store, segment = lake
    alert = the_alert(store)
    data = segment.read_bytes()
    at = data.index(b"MRN3001")
    try:
        segment.write_bytes(data[:at] + b"X" + data[at + 1:])  # one byte of the received message changed
        assert cli(cfg, "audit", "explain", alert["alert_id"]) == 3
        text = capsys.readouterr().out
        assert text.splitlines()[0].endswith(": MISMATCH")
        assert text.count("MISMATCH (the bytes in the landing file are not the bytes received)") == 7
    finally:
        segment.write_bytes(data)


def test_explain_names_what_is_missing(lake, capsys):
    cfg, store, _ = lake
    assert cli(cfg, "audit", "explain", "no-such-alert") == 1
    assert "no alert 'no-such-alert' in gold.deterioration_alerts" in capsys.readouterr().err
    assert cli(cfg, "audit", "explain", "@2026") == 2
    assert "a score row is PATIENT_KEY@SCORED_AT" in capsys.readouterr().err
    failed = [e for e in store.read_arrow("ops.audit_log").to_pylist() if e["outcome"] == "failed"]
    assert [e["statement"] for e in failed] == ["carelake audit explain no-such-alert"]


@pytest.fixture
def probe(tmp_path):
    """ops.diff_probe: v0 k=1,2,3; v1 k=2 changed, k=4 added; v2 k=3 deleted."""
    import pyarrow as pa

    from pipelines.store import MergeSpec, open_store

    cfg = make_config(tmp_path / "lake")
    store = open_store(cfg)
    rows = lambda *kv: pa.table({"k": [k for k, _ in kv], "v": [v for _, v in kv]})  # noqa: E731
    store.append("ops.diff_probe", rows((1, 10), (2, 20), (3, 30)))
    store.merge("ops.diff_probe", rows((2, 21), (4, 40)), MergeSpec(keys=("k",)))
    store.merge("ops.diff_probe", rows((3, -1)), MergeSpec(keys=("k",), delete_when="s.v < 0", insert=False))
    return cfg, store


def test_diff_lists_rows_added_changed_and_removed_by_key(probe, capsys):
    cfg, store = probe
    assert cli(cfg, "audit", "diff", "ops.diff_probe", "0", "2", "--key", "k", "--json") == 0
    summary, *changes = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {k: summary[k] for k in ("added", "changed", "removed", "key")} == {
        "added": 1, "changed": 1, "removed": 1, "key": ["k"]}
    assert changes == [{"change": "added", "key": {"k": 4}, "after": {"k": 4, "v": 40}},
                       {"change": "changed", "key": {"k": 2}, "columns": ["v"], "before": {"v": 20},
                        "after": {"v": 21}},
                       {"change": "removed", "key": {"k": 3}, "before": {"k": 3, "v": 30}}]
    # Without a key every row is compared whole: the changed row is one removed and one added.
    assert cli(cfg, "audit", "diff", "ops.diff_probe", "0", "1") == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("ops.diff_probe v0 -> v1 (whole rows (no key)): 2 added, 0 changed, "
                                           "1 removed")
    assert cli(cfg, "audit", "diff", "ops.diff_probe", "0", "1", "--key", "nope") == 2
    assert "has no column(s) ['nope'] to key the diff on" in capsys.readouterr().err
    assert cli(cfg, "audit", "diff", "ops.diff_probe", "0", "9", "--key", "k") == 1
    assert "version 9 does not exist" in capsys.readouterr().err


def test_as_of_a_version_or_a_time(probe, capsys):
    cfg, store = probe
    commits = {c.version: c.timestamp for c in store.history("ops.diff_probe")}
    assert cli(cfg, "audit", "as-of", "ops.diff_probe", "1", "--json") == 0
    head, *rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (head["version"], head["rows"], head["operation"]) == (1, 4, "MERGE")
    assert sorted((r["k"], r["v"]) for r in rows) == [(1, 10), (2, 21), (3, 30), (4, 40)]
    assert cli(cfg, "audit", "as-of", "ops.diff_probe", commits[0].isoformat(), "--limit", "1") == 0
    out = capsys.readouterr().out
    assert out.startswith("ops.diff_probe as of ") and ": version 0," in out and "3 rows" in out
    assert "(1 of 3 rows shown" in out
    assert cli(cfg, "audit", "as-of", "ops.diff_probe", "2001-01-01T00:00Z") == 1
    assert "did not exist at 2001-01-01" in capsys.readouterr().err
    events = sorted((e["action"], e["outcome"]) for e in store.read_arrow("ops.audit_log").to_pylist())
    assert events == [("as_of", "allowed"), ("as_of", "allowed"), ("as_of", "failed")]


def test_diff_keys_a_table_by_its_jobs_merge_keys(lake, capsys):
    cfg, store, _ = lake
    latest = store.version("gold.early_warning_scores")
    assert cli(cfg, "audit", "diff", "gold.early_warning_scores", "0", str(latest), "--json") == 0
    summary, *changes = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary["key"] == ["patient_key", "scored_at"] and summary["added"] == 2 == len(changes)
    assert {c["after"]["news2_score"] for c in changes} == {4, 6}


def test_restore_records_its_reason_in_the_commit_history_and_audit_log(probe, capsys):
    cfg, store = probe
    with pytest.raises(SystemExit) as exc:
        cli(cfg, "restore", "ops.diff_probe", "--version", "0")
    assert exc.value.code == 2 and "the following arguments are required: --reason" in capsys.readouterr().err
    assert cli(cfg, "restore", "ops.diff_probe", "--version", "0", "--reason", "  ") == 2
    assert "restore --reason must say why" in capsys.readouterr().err
    assert store.version("ops.diff_probe") == 2  # nothing restored without a reason

    assert cli(cfg, "restore", "ops.diff_probe", "--version", "0", "--reason", "INC-7: rows from a bad load") == 0
    capsys.readouterr()
    newest = store.history("ops.diff_probe", limit=1)[0]
    assert (newest.version, newest.operation) == (3, "RESTORE")
    assert newest.metadata["carelake.reason"] == "INC-7: rows from a bad load" and newest.metadata["carelake.actor"]
    assert cli(cfg, "history", "ops.diff_probe", "--limit", "1") == 0
    assert "RESTORE" in (line := capsys.readouterr().out.splitlines()[-1]) and "INC-7: rows from a bad load" in line
    assert cli(cfg, "restore", "ops.diff_probe", "--version", "99", "--reason", "typo") == 1
    capsys.readouterr()
    log = [(e["action"], e["outcome"], e["tables"], e["detail"].split(" | ")[0])
           for e in sorted(store.read_arrow("ops.audit_log").to_pylist(), key=lambda e: e["at_utc"])]
    assert log == [("restore", "allowed", [{"name": "ops.diff_probe", "version": 3}], "INC-7: rows from a bad load"),
                   ("restore", "failed", [{"name": "ops.diff_probe", "version": 99}], "typo")]


def test_an_alert_whose_score_row_was_withdrawn_is_explained_as_its_batch_wrote_it(lake, capsys):
    import pyarrow as pa

    cfg, store, _ = lake
    alert = the_alert(store)
    empty = pa.Table.from_pylist([], schema=store.read_arrow("gold.early_warning_scores").schema)
    store.overwrite("gold.early_warning_scores", empty, predicate=f"patient_key = '{alert['patient_key']}'")
    assert cli(cfg, "audit", "explain", alert["alert_id"], "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verdict"] == "verified" and r["score"]["withdrawn_since"] is True
    assert r["tables_read"]["gold.early_warning_scores"] < store.version("gold.early_warning_scores")
    key = f"{alert['patient_key']}@2026-11-21T10:00:00Z"  # by its key alone there is no alert to say when it was
    assert cli(cfg, "audit", "explain", key) == 1
    assert "never scored, or withdrawn since" in capsys.readouterr().err


def age_lake(root: Path, days: int) -> None:
    """Make everything under root `days` older: commit, removal and file times in the Delta logs, and every file's
    modification time (what vacuum and landing retention judge age by)."""
    import os

    shift_ms = days * 86_400_000
    for log in root.rglob("_delta_log/*.json"):
        actions = []
        for line in log.read_text().splitlines():
            action = json.loads(line)
            for kind, field in (("commitInfo", "timestamp"), ("remove", "deletionTimestamp"),
                                ("add", "modificationTime")):
                if kind in action and action[kind].get(field):
                    action[kind][field] -= shift_ms
            actions.append(json.dumps(action))
        log.write_text("\n".join(actions) + "\n")
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(path, (st.st_atime - days * 86400, st.st_mtime - days * 86400))


def test_an_alert_older_than_the_layers_retention_but_inside_the_audit_retention_stays_explainable(lake, capsys):
    """Runs last in this module: it vacuums the module's lakehouse."""
    import pyarrow as pa

    from pipelines.store import MergeSpec

    cfg, store, segment = lake
    alert = the_alert(store)
    # A correction rewrites the silver file the score read (copy-on-write): only the score's version needs it now.
    row = store.read_arrow("silver.observations").slice(0, 1).to_pylist()[0]
    fixed = pa.Table.from_pylist([{**row, "source_version": row["source_version"] + "~1"}],
                                 schema=store.read_arrow("silver.observations").schema)
    store.merge("silver.observations", fixed, MergeSpec(keys=("observation_id",)))
    age_lake(cfg.root, 40)  # the alert is now 40 days old: past a 30-day layer retention
    layers = [f"storage.retention_days.{k}=30" for k in ("bronze", "silver", "gold", "landing")]
    flags = [x for s in layers for x in ("--set", s)]

    assert cli(cfg, *flags, "--set", "storage.retention_days.audit=400", "vacuum", "--all") == 0
    swept = vacuumed(capsys.readouterr().out)
    assert swept["silver.observations"] == swept["landing/hl7"] == (400, 0)
    assert swept["ops.metrics"][0] == 90 and swept["gold.vitals_features"][0] == 30  # not walked by audits
    first = sum(n for _, n in swept.values())
    assert cli(cfg, "audit", "explain", alert["alert_id"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(": verified")

    # With the audit retention at 30 days too, vacuum takes what the alert's chain needs: the explanation says so.
    assert cli(cfg, *flags, "--set", "storage.retention_days.audit=30", "vacuum", "--all") == 0
    swept = vacuumed(capsys.readouterr().out)
    assert swept["silver.observations"][1] >= 1 and swept["landing/hl7"] == (30, 1), swept
    assert not segment.exists()
    assert cli(cfg, "audit", "explain", alert["alert_id"]) == 1
    assert "version" in (err := capsys.readouterr().err) and "can no longer be read" in err
    vacuums = [e for e in store.read_arrow("ops.audit_log").to_pylist() if e["action"] == "vacuum"]
    assert [e["rows"] for e in sorted(vacuums, key=lambda e: e["at_utc"])] == [first,
                                                                              sum(n for _, n in swept.values())]


def vacuumed(out: str) -> dict[str, tuple[int, int]]:
    """`vacuum --all`'s table: {table or landing feed: (days kept, files removed)}."""
    rows = [line.split() for line in out.splitlines()[2:] if line and not line.startswith("vacuum")]
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def test_vacuum_takes_a_table_or_all(probe, capsys):
    cfg, _ = probe
    for args in (("vacuum",), ("vacuum", "ops.diff_probe", "--all"), ("vacuum", "--all", "--retain-hours", "900")):
        assert cli(cfg, *args) == 2
        assert "vacuum takes a table, or --all" in capsys.readouterr().err
    assert cli(cfg, "vacuum", "--all", "--dry-run") == 0
    assert "vacuum --all: would remove 0 file(s)" in capsys.readouterr().out
