"""The spark-submit entry point: `spark-submit [spark options] bin/carelake-spark.py <carelake arguments>`.

spark-submit puts the script's own folder first on sys.path. Submitting `pipelines/cli.py` itself would let the
package's modules shadow the standard library's (`pipelines/secrets.py` for `secrets`); this folder holds
nothing but this script. The `carelake` packages come from the interpreter's environment (the project's
`.venv`) or, on a cluster, from the archive passed with `--py-files` (see docs/operations.md).
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
