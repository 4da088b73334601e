"""Rollout generation: the vLLM engine wrapper."""
