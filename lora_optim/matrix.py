"""Matrix views of weights and gradients.

A weight of shape ``(out, d1, d2, ...)`` (a conv kernel, say) is trained as the matrix
``(out, d1·d2·…)``: the einops pattern ``"o ... -> o (...)"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import einops
from torch import Tensor

__all__ = ["matrix_shape", "as_matrix", "writable_matrix"]


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(out, in)`` of the matrix view of a tensor of ``shape`` (``ndim >= 2``)."""
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs at least 2 dims, got shape {tuple(shape)}")
    inner = 1
    for size in shape[1:]:
        inner *= size
    return shape[0], inner


def as_matrix(tensor: Tensor) -> Tensor:
    """Read-only matrix view ``(out, rest)`` of ``tensor`` (a copy if the layout needs one); a
    2-D tensor is returned as it is."""
    if tensor.ndim == 2:
        return tensor
    return einops.rearrange(tensor, "o ... -> o (...)")


@contextmanager
def writable_matrix(tensor: Tensor) -> Iterator[Tensor]:
    """Yield a matrix whose in-place changes land in ``tensor``.

    A view when the layout allows it (contiguous weights); otherwise a contiguous copy that is
    written back on exit, so a channels-last or transposed weight is still updated in place.
    """
    if tensor.ndim == 2:
        yield tensor
        return
    try:
        view = tensor.view(tensor.shape[0], -1)
    except RuntimeError:
        view = None
    if view is not None:
        yield view
        return
    scratch = as_matrix(tensor).contiguous()
    yield scratch
    tensor.copy_(scratch.view(tensor.shape))
