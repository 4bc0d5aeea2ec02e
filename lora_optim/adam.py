"""Adam math as small pure functions.

Nothing here knows about projections, factors or shapes: every function takes tensors of any
shape and updates moments in place. :class:`lora_optim.LoRAAdam` feeds them the projected
factor gradients; dense parameters go through :func:`adamw_step_` unchanged.

With bias corrections :math:`c_1 = 1-\\beta_1^t` and :math:`c_2 = 1-\\beta_2^t` after
:math:`t` updates, one AdamW step on a tensor :math:`X` with gradient :math:`g` is

.. math::

    m &\\leftarrow \\beta_1 m + (1-\\beta_1) g, \\qquad
    v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2 \\\\
    X' &= X(1 - \\eta\\lambda) - \\frac{\\eta}{c_1}\\,
          \\frac{m}{\\sqrt{v}/\\sqrt{c_2} + \\epsilon}

which is exactly the sequence of operations of ``torch.optim.AdamW`` (single-tensor path).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["update_moments_", "adam_direction", "adamw_delta", "adamw_step_"]


def update_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float) -> None:
    """Exponential moving averages of the gradient and its square, in place.

    ``m ← β1·m + (1−β1)·g`` (as ``lerp``) and ``v ← β2·v + (1−β2)·g²``.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _denominator(exp_avg_sq: Tensor, step: int, beta2: float, eps: float) -> Tensor:
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    return (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float) -> Tensor:
    """Bias-corrected Adam direction ``m̂ / (√v̂ + ε)`` after ``step`` updates (a new tensor).

    ``m̂ = m / (1−β1^t)`` and ``√v̂ = √v / √(1−β2^t)``; ``ε`` is added to ``√v̂`` as torch does.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1 after an update, got {step}")
    return exp_avg.div(_denominator(exp_avg_sq, step, beta2, eps)).div_(1 - beta1**step)


def adamw_delta(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> Tensor:
    """Update the moments in place and return the AdamW step ``X' − X`` (``param`` is not changed).

    ``X' − X = −ηλ·X − (η/c1)·m/(√v/√c2 + ε)``. ``step`` counts updates including this one.
    The factor path of :class:`~lora_optim.LoRAAdam` needs the step itself (not the new value)
    because ``ΔW`` is formed from the factors before and after.
    """
    update_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
    step_size = lr / (1 - beta1**step)
    delta = torch.zeros_like(param) if weight_decay == 0 else param.mul(-lr * weight_decay)
    return delta.addcdiv_(exp_avg, _denominator(exp_avg_sq, step, beta2, eps), value=-step_size)


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on ``param`` in place, operation for operation as ``torch.optim.AdamW``
    with ``foreach=False`` (so results agree bit for bit). ``step`` counts updates including
    this one."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    update_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
    step_size = lr / (1 - beta1**step)
    param.addcdiv_(exp_avg, _denominator(exp_avg_sq, step, beta2, eps), value=-step_size)
