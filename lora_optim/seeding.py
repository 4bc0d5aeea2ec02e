"""Integer seeds and the random draws made from them.

The optimizer never touches torch's global RNG (switching optimizers must not change a user's
data order) and never stores generator objects (state must load with ``weights_only=True``).
Instead every random matrix is a pure function of plain ints: a user seed, the parameter's
position in the optimizer, and a draw counter, mixed with SplitMix64.

Draws made *during* a step (``random``'s factors, the bits of stochastic rounding) take their
counter from the device: a 0-dim int64 tensor in the state, advanced on the device only when the
step is taken (:mod:`lora_optim.engine`), so no host read is needed to know which draw comes
next and a compiled step never specialises on it. Those draws are a counter-based hash in torch
ops (:func:`hash_bits`: Wellons' ``lowbias32`` mixer on int64 tensors holding 32-bit values):
element ``i`` of draw ``c`` of stream ``seed`` is ``lowbias32(i ^ key)`` with
``key = step_key(seed, c)``, a pure function of three integers, the same on every device, in
eager and compiled code, and whatever the tensor's position in a batch. (Keys of different
draws can map two different elements to the same input, ``i ^ k = i' ^ k'``: two draws then
share a value at two positions, a correlation no use here can see.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["derive_seed", "seeded_generator", "gaussian", "uniform", "mix32", "step_key", "hash_bits", "hash_normal",
           "MASK32"]

_MASK64 = (1 << 64) - 1
#: The 32-bit mask of the hash values (they are held in int64 tensors).
MASK32 = (1 << 32) - 1


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


def mix32(x: Tensor) -> Tensor:
    """Wellons' ``lowbias32`` of every element of the int64 tensor ``x`` (values in ``[0, 2³²)``,
    results too): a bijection of 32-bit words with full avalanche, in ten elementwise ops. Products
    of two 32-bit words overflow int64 and wrap; only their low 32 bits are kept."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """:func:`mix32` of one Python int (the reference the tensor version is tested against)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def step_key(seed: int, counter: Tensor | int) -> Tensor | int:
    """The 32-bit key of draw ``counter`` of the stream ``seed`` (an int):
    ``((c + hi)·φ mod 2³²) ^ lo`` with ``(lo, hi)`` the halves of ``seed``'s low 64 bits and ``φ``
    the odd constant ``0x9E3779B9``, so distinct counters (below 2³²) give distinct keys; the
    hash that reads the key (:func:`hash_bits`) does the mixing. ``counter`` is a 0-dim int64
    tensor (the key is then one, on its device: no host read) or an int."""
    seed &= _MASK64
    low, high = seed & MASK32, seed >> 32
    if isinstance(counter, Tensor):
        return (((counter + high) * 0x9E3779B9) & MASK32) ^ low
    return (((counter + high) * 0x9E3779B9) & MASK32) ^ low


def hash_bits(index: Tensor, key: Tensor | int) -> Tensor:
    """32 random bits per element of the int64 ``index`` (values in ``[0, 2³²)``): ``lowbias32(index ^ key)``."""
    return mix32(index ^ key)


def _flat_index(numel: int, device: torch.device) -> Tensor:
    return torch.arange(numel, dtype=torch.int64, device=device)


def hash_normal(numel: int, key: Tensor | int, *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``numel`` i.i.d. ``N(0, 1)`` numbers (a flat tensor of ``dtype``) from the key of a draw:
    element ``i`` is ``Φ⁻¹((h_i + ½)/2³²)`` with ``h_i = lowbias32(i ^ key)``, computed in float64
    (``Φ⁻¹``: ``torch.special.ndtri``, exact to float64 rounding, |z| ≤ 6.2) and rounded once to
    ``dtype``. Element ``i`` depends on ``i`` and the key only (integer hash, one elementwise float64
    function), so a draw is the same whatever the device or the code path that makes it."""
    device = torch.device(device)
    bits = hash_bits(_flat_index(numel, device), key)
    uniform = bits.to(torch.float64).add_(0.5).mul_(2.0**-32)
    return torch.special.ndtri(uniform).to(dtype)
