"""Silver: parsed, validated, deduplicated, normalized clinical model. Pure transforms only."""
