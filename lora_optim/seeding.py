"""Integer seeds and the random draws made from them.

The optimizer never touches torch's global RNG (switching optimizers must not change a user's
data order) and never stores generator objects (state must load with ``weights_only=True``).
Instead every random matrix is a pure function of plain ints: a user seed, the parameter's
position in the optimizer, and a draw counter, mixed with SplitMix64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["derive_seed", "seeded_generator", "gaussian", "uniform"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """Mix any number of non-negative ints into one 63-bit seed (deterministic, order-sensitive).

    ``derive_seed(user_seed, param_index)`` names a parameter's stream and
    ``derive_seed(param_seed, draw_index)`` one draw of it.
    """
    h = 0x6A09E667F3BCC908
    for key in keys:
        if not isinstance(key, int) or isinstance(key, bool):
            raise TypeError(f"seed keys must be ints, got {key!r}")
        h = _splitmix64(h ^ (key & _MASK64))
    return h >> 1


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed`` (the global RNG is untouched).

    Streams differ between device types (a CPU and a CUDA generator with the same seed give
    different numbers), so a run is reproducible on the same kind of device.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def gaussian(shape: tuple[int, ...], std: float, seed: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Entries i.i.d. ``N(0, std²)`` drawn from ``seed`` alone (one op: the same numbers as
    ``randn(...)·std``)."""
    generator = seeded_generator(seed, device)
    return torch.normal(0.0, std, shape, generator=generator, dtype=dtype, device=device)


def uniform(shape: tuple[int, ...], bound: float, seed: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Entries i.i.d. ``U(−bound, bound)`` drawn from ``seed`` alone."""
    generator = seeded_generator(seed, device)
    return torch.rand(shape, generator=generator, dtype=dtype, device=device).mul_(2 * bound).sub_(bound)


def kaiming_uniform_bound(fan_in: int, a: float = math.sqrt(5)) -> float:
    """Bound of ``torch.nn.init.kaiming_uniform_(a=a)`` for ``fan_in``: ``√(6/((1+a²)·fan_in))``.

    With ``a = √5`` (PEFT's LoRA init) this is ``1/√fan_in``.
    """
    return math.sqrt(6.0 / ((1.0 + a * a) * fan_in))
