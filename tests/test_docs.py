"""The documentation: the generated reference pages match the code, and every relative link points somewhere."""

from __future__ import annotations

import re
import sys

import pytest

from pipelines.docgen import FOLDER, REPO, config_keys, pages
from tests.conftest import make_config


def test_the_reference_pages_are_generated_from_the_current_code(tmp_path):
    generated = pages(make_config(tmp_path / "lake"))
    if sys.version_info[:2] != (3, 11):  # argparse's help layout differs between Python versions; CI runs 3.11
        generated.pop(FOLDER / "cli.md")
    stale = [p.name for p, text in generated.items() if not p.exists() or p.read_text() != text]
    assert stale == [], f"docs/reference/{stale} out of date: run `.venv/bin/python -m pipelines.docgen`"


def test_every_table_and_command_is_in_the_reference():
    tables = (FOLDER / "tables.md").read_text()
    for name in ("bronze.hl7_messages", "silver.observations", "silver.quarantine", "gold.deterioration_alerts",
                 "gold.imaging_worklist", "gold.claims_fraud_scores", "ops.metrics", "ops.audit_log"):
        assert f"\n## {name}\n" in tables, name
    assert "| `patient_key` | `string` |" in tables
    cli = (FOLDER / "cli.md").read_text()
    for command in ("run", "sql", "gateway", "audit explain", "imaging replay", "train"):
        assert f"\n## carelake {command}\n" in cli, command


def test_config_comments_are_found_above_beside_and_continued():
    text = """# the root, above
root: ./x
spark:
  master: "local[*]"   # beside
  # above a nested key
  ui: false
retention:           # a section
  bronze: 7          # days
                     # and continued
  silver: 3
list: [a, b]
aliases:
  "http://x/y": Z    # a quoted key
"""
    assert config_keys(text) == [
        ("root", "./x", "the root, above"), ("spark.master", '"local[*]"', "beside"),
        ("spark.ui", "false", "above a nested key"), ("retention", "", "a section"),
        ("retention.bronze", "7", "days and continued"), ("retention.silver", "3", ""), ("list", "[a, b]", ""),
        ("aliases.http://x/y", "Z", "a quoted key")]


def test_every_configuration_key_of_base_yaml_is_in_the_reference():
    import yaml

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    base = yaml.safe_load((REPO / "conf" / "base.yaml").read_text())
    documented = {k: v for k, v, _ in config_keys((REPO / "conf" / "base.yaml").read_text())}
    # a mapping written as one value (`sla: {STAT: 1h, ...}`) is documented as a whole
    flow = {k for k, v in documented.items() if v.startswith("{")}
    undocumented = [k for k in leaves(base) if k not in documented
                    and not any(".".join(k.split(".")[:n]) in flow for n in range(1, k.count(".") + 1))]
    assert undocumented == []


PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_files_that_exist(page):
    path = REPO / page
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    missing = [link for link in links if "://" not in link and not link.startswith("mailto:")
               and not (path.parent / link).exists()]
    assert missing == [], f"{page} links to {missing}"
