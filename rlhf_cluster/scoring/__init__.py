"""Frozen-model scoring: reference log-probs and rule-based rewards."""
