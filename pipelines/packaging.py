"""The archive a Spark cluster's executors import carelake from: `spark-submit --py-files dist/carelake.zip`.

    python -m pipelines.packaging [dist/carelake.zip]

It holds carelake's own packages (pipelines, bronze, silver, gold, models) and their package data, nothing
else: the workers' Python must already have carelake's pinned dependencies (pyspark, pyarrow, deltalake, ...),
as installed by `pip install -e .` or shipped as a packed environment.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

PACKAGES = ("pipelines", "bronze", "silver", "gold", "models")
REPO = Path(__file__).resolve().parents[1]


def build_zip(out: Path, repo: Path = REPO) -> Path:
    """Write carelake's packages into `out` (a zip importable from sys.path); returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in PACKAGES:
            folder = repo / package
            if not (folder / "__init__.py").is_file():
                raise FileNotFoundError(f"{folder} is not a Python package: run this from a carelake checkout")
            for path in sorted(folder.rglob("*")):
                if "__pycache__" in path.parts or not path.is_file() or path.suffix in (".pyc", ".pyo"):
                    continue
                zf.write(path, path.relative_to(repo).as_posix())
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else REPO / "dist" / "carelake.zip"
    print(build_zip(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
