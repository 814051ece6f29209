"""Configuration: flag > environment > overlay > base, and clear errors for wrong values."""

from __future__ import annotations

import pytest

from pipelines.config import load_config, parse_duration_ms
from pipelines.errors import ConfigError
from tests.conftest import REPO

CONF = REPO / "conf"


def test_base_and_overlay_resolve_with_published_defaults(tmp_path):
    cfg = load_config(env="local", conf_dir=CONF, environ={})
    assert cfg.storage.engine == "auto" and cfg.env == "local"
    g = cfg.gateway
    assert (g.header_timeout_s, g.body_timeout_s, g.frame_timeout_s, g.shutdown_timeout_s) == (10, 60, 60, 10)
    assert (g.max_batch_messages, g.reject_keep_kb, g.rejects_max_mb, g.rejects_max_age_s) == (
        100_000, 64, 1024, 14 * 86_400)
    assert cfg.storage.retention_days["silver"] == 2555
    assert cfg.landing.feeds == ("hl7", "fhir", "devices", "dicom", "claims", "x12")
    test = load_config(env="test", conf_dir=CONF, environ={})
    assert test.spark.master == "local[2]" and test.streaming.interval_ms == 500


def test_precedence_flag_over_env_over_file(tmp_path):
    env = {"CARELAKE_ROOT": str(tmp_path / "from-env"), "CARELAKE_STORAGE__COMMIT_RETRIES": "7",
           "CARELAKE_ENV": "test"}
    cfg = load_config(conf_dir=CONF, environ=env)
    assert cfg.env == "test"
    assert cfg.root == (tmp_path / "from-env").resolve()
    assert cfg.storage.commit_retries == 7
    cfg = load_config(conf_dir=CONF, environ=env, root=tmp_path / "flag",
                      overrides={"storage.commit_retries": "9"})
    assert cfg.root == (tmp_path / "flag").resolve() and cfg.storage.commit_retries == 9


@pytest.mark.parametrize(("overrides", "message"), [
    ({"storage.engine": "duckdb"}, "storage.engine must be one of auto, delta-rs, delta-spark"),
    ({"storage.engin": "x"}, "unknown configuration key 'storage.engin'"),
    ({"spark.shuffle_partitions": "many"}, "spark.shuffle_partitions must be a whole number"),
    ({"streaming.interval": "soon"}, "expected a duration like 500ms"),
    ({"landing.feeds": "HL7!"}, "not a valid feed name"),
    ({"storage.retention_days.silver": "0"}, "retention_days.silver must be at least 1 day"),
    ({"spark.ui": "maybe"}, "spark.ui must be true or false"),
    ({"gateway.body_timeout": "0s"}, "gateway.body_timeout must be a positive duration"),
    ({"gateway.header_timeout": "soon"}, "gateway.header_timeout: expected a duration like 500ms"),
    ({"gateway.max_batch_messages": "0"}, "gateway.max_batch_messages must be at least 1 message"),
    ({"gateway.reject_keep_kb": "-1"}, "gateway.reject_keep_kb must be 0"),
    ({"gateway.reject_keep_kb": "20000"}, "to gateway.max_message_mb in KiB"),
    ({"gateway.rejects_max_mb": "0"}, "gateway.rejects_max_mb must be at least 1 MB"),
    ({"claims.x12_validation": "strict"}, "claims.x12_validation must be one of envelope, implementation_guide"),
    ({"claims.x12_versions": ["5010"]}, "claims.x12_versions must list X12 implementation guide versions"),
    ({"claims.part2_diagnosis_prefixes": ["10F"]}, "claims.part2_diagnosis_prefixes must be ICD-10-CM codes"),
    ({"claims.part2_procedure_codes": ["H20"]}, "claims.part2_procedure_codes must be CPT"),
    ({"claims.part2_drgs": ["89"]}, "claims.part2_drgs must be 3-digit MS-DRG codes"),
    ({"claims.fraud_weights.duplicate": 150}, "claims.fraud_weights needs a weight 0-100"),
    ({"claims.fraud_medium_from": 70}, "claims.fraud_medium_from and fraud_high_from must satisfy"),
    ({"claims.unbundling_pairs": [["85025"]]}, "claims.unbundling_pairs rows are a comprehensive"),
    ({"claims.timed_minutes": ["99291=74"]}, "claims.timed_minutes entries are CODE:MINUTES"),
    ({"claims.em_families.office_new": ["99213"]}, "claims.em_families maps a family name to its E/M codes"),
    ({"claims.upcoding_min_excess": 1.5}, "claims.upcoding_min_lines must be at least 1 and"),
    ({"claims.chart_codes.imaging": ["7001"]}, "claims.chart_codes maps inpatient_day, critical_care, imaging"),
])
def test_wrong_values_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(env="test", conf_dir=CONF, environ={}, overrides=overrides)


def test_unknown_overlay_lists_the_available_ones():
    with pytest.raises(ConfigError, match="choose one of: cluster, local, test"):
        load_config(env="prod", conf_dir=CONF, environ={})


def test_unknown_environment_variable_key_is_refused():
    with pytest.raises(ConfigError, match="environment variable CARELAKE_STORAGE__NOPE"):
        load_config(env="test", conf_dir=CONF, environ={"CARELAKE_STORAGE__NOPE": "1"})


def test_spark_conf_is_free_form_and_merges():
    cfg = load_config(env="test", conf_dir=CONF, environ={}, overrides={"spark.conf": {"spark.foo": "1"}})
    assert cfg.spark.conf["spark.foo"] == "1"
    assert cfg.spark.conf["spark.sql.streaming.minBatchesToRetain"] == "10"


def test_config_is_frozen():
    cfg = load_config(env="test", conf_dir=CONF, environ={})
    with pytest.raises(AttributeError):
        cfg.root = "/elsewhere"


@pytest.mark.parametrize(("text", "ms"), [("500ms", 500), ("5s", 5000), ("2m", 120000), ("1.5s", 1500), (250, 250),
                                         ("14d", 14 * 86_400_000)])
def test_durations(text, ms):
    assert parse_duration_ms(text, "k") == ms


def test_the_configured_news2_chart_is_the_rcp_2017_chart_and_a_variation_is_checked():
    from gold.news2 import RCP_2017

    cfg = load_config(env="test", conf_dir=CONF, environ={})
    assert cfg.gold.charts == RCP_2017 and cfg.gold.alert_levels == ("news2_medium", "news2_high", "qsofa", "model")
    local = load_config(env="test", conf_dir=CONF, environ={}, overrides={"gold.news2.high_from": 6})
    assert local.gold.charts.high_from == 6 and local.gold.charts.pulse == RCP_2017.pulse
    for overrides, message in [({"gold.news2.pulse": [[130, 2], [40, 3]]}, "gold.news2: pulse"),
                               ({"gold.news2.high_from": 4}, "medium_from .5. must be positive and below high_from"),
                               ({"gold.alert_levels": ["news2_high", "sepsis"]}, "gold.alert_levels must list"),
                               ({"gold.qsofa_alert_from": 4}, "gold.qsofa_alert_from must be 1, 2 or 3")]:
        with pytest.raises(ConfigError, match=message):
            load_config(env="test", conf_dir=CONF, environ={}, overrides=overrides)


def test_reading_the_configuration_loads_neither_numpy_nor_pandas():
    """Every carelake process reads it, the gateway too (its memory is bounded and measured)."""
    import subprocess
    import sys

    code = ("import sys; from pipelines.config import load_config; load_config(env='local', root='/tmp/x', "
            "environ={}); print(sorted(m for m in ('numpy', 'pandas', 'pyspark') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
