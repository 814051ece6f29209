"""The session factory: what a carelake process leaves behind in the temp folder."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, carelake_env

SESSION = """
import json, os
from tests.conftest import make_config
from pipelines.spark import create_spark

spark = create_spark(make_config(os.environ["CARELAKE_ROOT"]).spark)
spark.range(3).count()
folder = spark._jvm.java.lang.System.getProperty("java.io.tmpdir")
print(json.dumps({"folder": folder, "inside": sorted(os.listdir(folder))}))
"""


def test_the_driver_jvm_scratch_folder_is_the_process_own_and_removed_at_exit(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**carelake_env(tmp_path / "lake"), "TMPDIR": str(temp)}
    proc = subprocess.run([sys.executable, "-c", SESSION], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["folder"].startswith(str(temp / "carelake-spark-"))
    assert any(name.startswith("artifacts-") for name in seen["inside"])  # Spark 4 makes one per session
    assert list(temp.iterdir()) == []  # removed when the process ended, artifacts folder and all
