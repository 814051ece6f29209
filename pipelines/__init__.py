"""carelake runtime: configuration, Spark, table store, streaming runner, jobs and CLI.

The only package that does I/O; bronze/silver/gold/models hold pure transforms.
"""

__version__ = "0.1.0"
