"""Thin Ray actors around `rlhf_cluster` objects, the pools that hold them, the driver and the CLI."""
