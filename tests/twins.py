"""Reference twins: explicit graph-side parametrisations trained by ``torch.optim.AdamW``.

A twin holds the frozen initial weights ``W0`` of the chosen parameters and trainable factors,
and evaluates the model with ``W = W0 + s·Δ(A, B)`` through ``torch.func.functional_call``, so
autograd (not our projection code) computes the factor gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def lora_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A·B``."""
    return A @ B


def prune_(weight: torch.Tensor, sparsity: float = 0.5) -> torch.Tensor:
    """Zero the ``sparsity`` share of entries of smallest magnitude in place; returns the mask ``W ≠ 0``."""
    with torch.no_grad():
        k = int(sparsity * weight.numel())
        threshold = weight.abs().flatten().kthvalue(k).values
        weight.masked_fill_(weight.abs() <= threshold, 0.0)
    return weight != 0


def additive_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Δ_ij = A[i, j mod r] + B[i mod r, j]`` built with index tensors."""
    out_features, rank = A.shape
    in_features = B.shape[1]
    cols = torch.arange(in_features) % rank
    rows = torch.arange(out_features) % rank
    return A[:, cols] + B[rows, :]


class GraphTwin:
    """Graph-side twin of a model: ``W = W0 − s·delta(A0, B0) + s·delta(A, B)`` for each
    factorised parameter.

    ``factors`` maps parameter name -> (A0, B0, scale); every other trainable parameter of the
    model named in ``dense`` is trained directly. ``param_groups`` is a list of dicts of AdamW
    hyperparameters with keys ``names`` (parameter names in the group).
    """

    def __init__(self, model: nn.Module, factors: dict, dense: list[str], groups: list[dict], delta=lora_delta):
        self.model = model
        self.delta = delta
        params = dict(model.named_parameters())
        # W = W0 − s·Δ(A0, B0) + s·Δ(A, B): training starts at W0 whatever the init.
        self.base = {
            name: params[name].detach() - scale * delta(A, B).detach().reshape(params[name].shape)
            for name, (A, B, scale) in factors.items()
        }
        self.scale = {name: scale for name, (_, _, scale) in factors.items()}
        self.A = {name: nn.Parameter(A.detach().clone()) for name, (A, _, _) in factors.items()}
        self.B = {name: nn.Parameter(B.detach().clone()) for name, (_, B, _) in factors.items()}
        self.dense = {name: nn.Parameter(params[name].detach().clone()) for name in dense}
        torch_groups = []
        for group in groups:
            tensors = []
            for name in group["names"]:
                tensors += [self.A[name], self.B[name]] if name in factors else [self.dense[name]]
            hyper = {k: v for k, v in group.items() if k != "names"}
            torch_groups.append({"params": tensors, **hyper})
        self.optimizer = torch.optim.AdamW(torch_groups, foreach=False)

    def weights(self) -> dict[str, torch.Tensor]:
        """Current effective weights of the factorised and dense parameters."""
        weights = dict(self.dense)
        for name, base in self.base.items():
            delta = self.delta(self.A[name], self.B[name]).reshape(base.shape)
            weights[name] = base + self.scale[name] * delta
        return weights

    def loss(self, loss_fn, *inputs) -> torch.Tensor:
        """``loss_fn(model(*inputs))`` evaluated at the twin's weights."""
        return loss_fn(functional_call(self.model, self.weights(), inputs))

    def step(self, loss_fn, *inputs) -> float:
        """One AdamW step of the twin; returns the loss before it."""
        self.optimizer.zero_grad()
        loss = self.loss(loss_fn, *inputs)
        loss.backward()
        self.optimizer.step()
        return loss.item()
