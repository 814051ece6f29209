# %% [markdown]
# # Explore a carelake lakehouse
# Parameters first; everything below calls the same functions as the `carelake` CLI.

# %%
import os

ROOT = os.environ.get("CARELAKE_ROOT", "./lakehouse")
ENV = os.environ.get("CARELAKE_ENV", "local")

# %%
from pipelines.config import load_config
from pipelines.spark import create_spark
from pipelines.store import open_store

cfg = load_config(env=ENV, root=ROOT)
spark = create_spark(cfg.spark)
store = open_store(cfg, spark)

# %% [markdown]
# Tables, their versions and row counts, then a time-travel read of the first table.

# %%
tables = {name: store.info(name) for name in store.list_tables()}
for name, info in tables.items():
    print(f"{name:32} v{info.version:<5} {info.rows:>10,} rows  last commit {info.last_commit:%Y-%m-%d %H:%M:%S}")

# %%
if tables:
    first = next(iter(tables))
    store.read(first, version=0).show(5, truncate=60)
