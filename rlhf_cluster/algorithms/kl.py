"""KL estimators between the policy and the reference, and the KL coefficient controllers."""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, k3_clamp: float | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with ``log r = ref - logp``.

    ``k1 = -log r`` (unbiased, can be negative), ``k2 = 0.5 (log r)^2``,
    ``k3 = exp(log r) - 1 - log r`` (unbiased and >= 0). Gradients flow into ``logprobs`` only.
    ``k3_clamp``: k3's ``log r`` is clamped to ``[-k3_clamp, k3_clamp]`` first (its gradient is
    zero where the clamp binds).
    """
    log_r = ref_logprobs.detach() - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        # exp overflows long before the clamp bound matters for any real policy/ref pair.
        bound = 20.0 if k3_clamp is None else min(k3_clamp, 20.0)
        log_r = log_r.clamp(-bound, bound)
        return torch.exp(log_r) - 1.0 - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op so it is interchangeable with the adaptive one."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, kl: float, n_steps: int) -> None:
        """Keep the coefficient unchanged."""

    def state_dict(self) -> dict[str, float]:
        """Checkpointable state."""
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.value = float(d["value"])

    def override(self, cfg, coef: bool) -> None:
        """A resume's new settings (a `KLConfig`) replace the checkpoint's state: the coefficient
        when `coef` (it was changed)."""
        if coef:
            self.value = float(cfg.coef)


class AdaptiveKLController:
    """Proportional controller (Ziegler et al. 2019) steering the observed KL towards ``target``.

    ``error = clip(kl / target - 1, -0.2, 0.2)``; ``coef *= 1 + error * n_steps / horizon``.
    The clip bounds how fast one noisy KL reading can move the coefficient.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be > 0")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        """Move the coefficient after observing mean KL ``kl`` over ``n_steps`` samples/steps."""
        error = min(max(float(kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Checkpointable state (the coefficient must survive restarts)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = float(d.get("horizon", self.horizon))

    def override(self, cfg, coef: bool) -> None:
        """A resume's new settings (a `KLConfig`): steer towards the new target over the new
        horizon; the coefficient restarts from `coef` when `coef` (it was changed), else it keeps
        where the controller had taken it."""
        self.target, self.horizon = float(cfg.target), float(cfg.horizon)
        if coef:
            self.value = float(cfg.coef)
