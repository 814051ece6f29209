"""Gold: scores, alerts, worklists and marts for people. Pure transforms only."""
