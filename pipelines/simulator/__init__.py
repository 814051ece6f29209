"""The hospital simulator behind `carelake simulate`: a seeded, reproducible synthetic hospital written as feeds.

Light on import (no Spark, dbldatagen or pydicom until a simulation runs), so `carelake --help` stays instant.
Entry points: `resolve_params` (config + flags -> SimParams) and `simulate` (SparkSession, SimParams -> Summary).
"""
