"""Model-free reward shaping and sample filters."""

from .shaping import dynamic_sampling_filter, ensemble, length_penalty, overlong_filter_mask, overlong_penalty

__all__ = ["dynamic_sampling_filter", "ensemble", "length_penalty", "overlong_filter_mask", "overlong_penalty"]
