"""The AdamW update as a pure function of tensors: no state, no communication.

Written to follow ``torch.optim.AdamW``'s single-tensor path operation for operation (decoupled
decay, ``lerp`` for the first moment, bias corrections folded into the step size and the
denominator), so a sharded optimizer that calls it on slices of blocks matches
``torch.optim.AdamW`` on the whole parameter to the last bit when it sees the same gradients.
"""

from __future__ import annotations

import torch


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on ``param`` and its moments; ``step`` counts from 1."""
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
