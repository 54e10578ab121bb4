"""Lookahead (Zhang et al. 2019, "k steps forward, 1 step back") around another optimizer, its slow weights starting
at the weights the optimizer is built with, as in the paper and the official REFERS code (timm's `Lookahead` starts
them at its first synchronisation, step k, so that sync does not move the weights)."""

from __future__ import annotations

import torch

# Names kept as timm's, so a checkpoint's optimizer state reads the same: the per-parameter slow weights in the base
# optimizer's state, the step count and settings in each parameter group.
SLOW_WEIGHTS_KEY = "lookahead_slow_buff"


class Lookahead(torch.optim.Optimizer):
    """Every `k` steps of `base_optimizer`, the slow weights move `alpha` of the way towards the (fast) weights and the
    fast weights restart from them. The slow weights start as a copy of the weights at construction.

    The parameter groups are the base optimizer's (a scheduler's learning rates reach it; each group also holds
    `lookahead_alpha`, `lookahead_k`, `lookahead_step`) and so is the state, slow weights included, so `state_dict` /
    `load_state_dict` resume a run exactly."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, alpha: float = 0.5, k: int = 5):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in [0, 1], got {alpha}")
        if int(k) != k or k < 1:
            raise ValueError(f"Lookahead k must be an integer >= 1, got {k}")
        settings = {"lookahead_alpha": float(alpha), "lookahead_k": int(k), "lookahead_step": 0}
        super().__init__([{"params": group["params"]} for group in base_optimizer.param_groups], settings)
        self.base_optimizer = base_optimizer
        self._share_base_groups()
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    self.state[param][SLOW_WEIGHTS_KEY] = param.detach().clone()

    def _share_base_groups(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)

    @torch.no_grad()
    def synchronize(self, group: dict) -> None:
        """Slow weights += alpha * (fast - slow); fast weights = slow weights, for the parameters that got a
        gradient."""
        for param in group["params"]:
            if param.grad is None:
                continue
            slow = self.state[param].setdefault(SLOW_WEIGHTS_KEY, param.detach().clone())
            slow.add_(param - slow, alpha=group["lookahead_alpha"])
            param.copy_(slow)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.base_optimizer.step(closure)
        for group in self.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"] == 0:
                self.synchronize(group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base_groups()
