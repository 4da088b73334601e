"""Frozen-model scoring: reference log-probs, reward models and rule-based rewards, and the
coalescing of many groups' scoring calls into one (`call_coalescing`)."""
