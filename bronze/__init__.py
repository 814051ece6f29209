"""Bronze: feeds landed exactly as received, plus ingest metadata. Pure transforms only."""
