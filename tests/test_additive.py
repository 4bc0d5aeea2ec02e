"""The additive projection: gradients are autograd of the explicit parametrisation."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_optim import get_projection
from lora_optim.projections import FactorChange
from lora_optim.projections.additive import fold_columns, fold_rows
from twins import additive_delta

shapes = st.tuples(st.integers(1, 23), st.integers(1, 23), st.integers(1, 9))


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.25, 4.0))
def test_projected_gradients_equal_autograd(shape, seed, scale):
    out_features, in_features, rank = shape
    rank = min(rank, out_features, in_features)
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    C = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    A = torch.randn(out_features, rank, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(rank, in_features, generator=gen, dtype=torch.float64, requires_grad=True)
    W = W0 + scale * additive_delta(A, B)
    loss = (torch.sin(W) * C).sum()
    G, = torch.autograd.grad(loss, W, retain_graph=True)
    grad_A, grad_B = torch.autograd.grad(loss, (A, B))
    G_before = G.clone()
    ours_A, ours_B = get_projection("additive").project(G, A.detach(), B.detach())
    ours_A, ours_B = scale * ours_A, scale * ours_B  # project gives the gradients at s = 1
    torch.testing.assert_close(ours_A, grad_A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_B, grad_B, rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G_before)  # the gradient is read, never written


@given(shapes, st.integers(0, 2**31 - 1))
def test_add_delta_equals_explicit_change(shape, seed):
    out_features, in_features, rank = shape
    rank = min(rank, out_features, in_features)
    gen = torch.Generator().manual_seed(seed)
    A, dA = (torch.randn(out_features, rank, generator=gen, dtype=torch.float64) for _ in range(2))
    B, dB = (torch.randn(rank, in_features, generator=gen, dtype=torch.float64) for _ in range(2))
    target = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    expected = target + 0.5 * (additive_delta(A + dA, B + dB) - additive_delta(A, B))
    get_projection("additive").add_delta_(target, FactorChange(A, B, A + dA, B + dB, dA, dB), 0.5)
    torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-12)


def test_folds_are_block_sums():
    G = torch.arange(35, dtype=torch.float64).reshape(5, 7)
    # columns 0..6 with r = 3: k=0 <- {0, 3, 6}, k=1 <- {1, 4}, k=2 <- {2, 5}
    torch.testing.assert_close(fold_columns(G, 3)[:, 0], G[:, 0] + G[:, 3] + G[:, 6])
    torch.testing.assert_close(fold_columns(G, 3)[:, 2], G[:, 2] + G[:, 5])
    torch.testing.assert_close(fold_rows(G, 2)[1], G[1] + G[3])
    torch.testing.assert_close(fold_rows(G, 2)[0], G[0] + G[2] + G[4])


def test_additive_change_can_have_rank_2r():
    """``A·E_c + E_r·B`` reaches rank 2r where LoRA's ``A·B`` stops at r."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    B = torch.randn(2, 32, generator=gen, dtype=torch.float64)
    assert torch.linalg.matrix_rank(additive_delta(A, B)).item() == 4
    assert torch.linalg.matrix_rank(A @ B).item() == 2
