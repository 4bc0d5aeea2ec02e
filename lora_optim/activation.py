"""Activation-side mode: factor gradients from a layer's input and output gradient, never ``G``.

For a linear layer ``Y = X·Wᵀ + b`` over ``n`` rows (tokens), ``G = ∂L/∂W = δYᵀ·X`` with
``δY = ∂L/∂Y``. Every projection is linear in ``G``, so the factor gradients can be formed from
``X`` (``n×in``) and ``δY`` (``n×out``) directly (:meth:`Projection.project_activations`); for
``lora`` and ``random``

.. math::

    g_A = s\\,G B^\\top = s\\,\\delta Y^\\top (X B^\\top), \\qquad
    g_B = s\\,A^\\top G = s\\,(\\delta Y A)^\\top X,

four GEMMs with an inner or outer size ``r`` (``2·n·r·(in+out)`` multiply-adds) instead of the
dense weight-gradient GEMM (``n·in·out``); ``additive`` uses block sums of the features of ``X``
and ``δY`` instead. With ``W.requires_grad = False`` autograd neither runs that GEMM nor keeps
``G``: the compute and memory of graph LoRA, with the model graph untouched.

``handle = opt.attach(model)`` is the explicit switch. For every ``nn.Linear`` of ``model`` whose
weight is a low-rank parameter of the optimizer (and requires grad) it

* sets ``weight.requires_grad = False`` (``handle.detach()`` restores it);
* registers a forward hook that keeps the layer's input ``X`` and registers a hook on the output
  ``Y`` that receives ``δY`` (the total gradient of ``Y``, over all its consumers);
* in that hook forms ``(g_A, g_B)`` and adds them to the step's sums
  (:mod:`lora_optim.accumulation`), then releases ``X``.

A layer called several times in one forward (weight sharing) adds one piece per call, and
micro-batches add up until ``opt.step()``, which takes the factor step with the sums (exact: the
factors do not change within a step). ``opt.zero_grad()`` discards the sums as it discards
``p.grad``. Other parameters are untouched: biases, dense groups and low-rank weights of layers
this mode cannot handle keep the ``G`` path; the latter are listed in a warning.

Non-finite values: ``G`` never exists, so the check of the ``nonfinite`` option is made on the
summed factor gradients at ``step()`` (a NaN or Inf in ``X`` or ``δY`` reaches them through the
products): the parameter is skipped, or ``step()`` raises before changing anything.

Handled: ``nn.Linear`` (and subclasses that keep its ``forward``), called through the module.
Falling back to ``G``: other layer types (convolutions, embeddings), weights shared with such a
layer (tied embeddings), weights of ``nn.MultiheadAttention`` (it reads ``out_proj.weight``
without calling the module). A weight that the model also uses outside its module's ``forward``
(``F.linear(x, layer.weight)``) cannot be seen by module hooks: do not attach such a model.
Each forward's input ``X`` is kept until its backward as autograd keeps it for ``W``'s gradient;
a second backward through the same graph (``retain_graph=True``) raises, and ``X`` must not be
modified in place between forward and backward (checked).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lora_optim import accumulation

if TYPE_CHECKING:  # pragma: no cover
    from lora_optim.optimizer import LoRAAdam

__all__ = ["ActivationSide", "supported_layer_forwards"]


def _linear_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["input"]


#: Layers handled, by their ``forward`` function, with how to read the input from the call's
#: ``(args, kwargs)``. Inputs and outputs are ``(..., in)`` and ``(..., out)``: rows are tokens.
_INPUT_READERS: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], Tensor]] = {
    nn.Linear.forward: _linear_input,
}

#: Modules that use their children's weights without calling the children.
_FUNCTIONAL_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def supported_layer_forwards() -> list[str]:
    """Qualified names of the ``forward`` functions of the layers the mode handles."""
    return sorted(f.__qualname__ for f in _INPUT_READERS)


class ActivationSide:
    """Handle of the activation-side mode of a :class:`~lora_optim.LoRAAdam` on one model.

    Made by :meth:`LoRAAdam.attach` (see the module docstring). ``detach()`` (alias
    ``remove()``, or leaving a ``with`` block) takes the hooks off and restores
    ``requires_grad``; sums not yet stepped stay in the optimizer state for ``step()``.

    Attributes:
        attached: names (as in ``model.named_parameters()``) of the weights handled here.
        fallback: ``{name: reason}`` of the low-rank parameters left on the ``G`` path.
    """

    def __init__(self, optimizer: LoRAAdam, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach expects an nn.Module, got {type(model).__name__}")
        self._optimizer = optimizer
        taken = {id(p) for mode in optimizer._grad_modes if isinstance(mode, ActivationSide) for p in mode._params}
        names: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), name)
        functional = {id(child) for module in model.modules() if isinstance(module, _FUNCTIONAL_PARENTS)
                      for child in module.modules() if child is not module}
        # Every module holding each parameter, and whether it can be handled.
        holders: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for pname, param in module.named_parameters(recurse=False):
                holders.setdefault(id(param), []).append((module, pname))

        self.attached: list[str] = []
        self.fallback: dict[str, str] = {}
        self._params: list[Tensor] = []
        self._requires_grad: list[bool] = []
        self._hooks: list[Any] = []
        self._anchors: dict[torch.device, Tensor] = {}
        plan: list[tuple[nn.Module, Tensor, int, str]] = []
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if not optimizer._is_low_rank(p, group):
                    continue
                name = names.get(id(p), f"<parameter {optimizer._position(p)} of the optimizer, not in the model>")
                if id(p) in taken:
                    raise ValueError(f"{name} is already attached by another attach() handle of this optimizer")
                if not p.requires_grad:  # frozen: the plain mode would not train it either
                    continue
                reason = self._unsupported(holders.get(id(p), []), functional)
                if reason is not None:
                    self.fallback[name] = reason
                    continue
                for module in {id(module): module for module, _ in holders[id(p)]}.values():
                    plan.append((module, p, index, name))
                self.attached.append(name)
                self._params.append(p)
        if self.fallback:
            listing = "; ".join(f"{name} ({reason})" for name, reason in self.fallback.items())
            warnings.warn(f"attach: {len(self.fallback)} low-rank parameter(s) keep the full-gradient (G) path: "
                          f"{listing}", stacklevel=3)
        for module, p, index, name in plan:
            reader = _INPUT_READERS[type(module).forward]
            hook = functools.partial(self._on_forward, p=p, group_index=index, name=name, reader=reader)
            self._hooks.append(module.register_forward_hook(hook, with_kwargs=True))
        for p in self._params:
            self._requires_grad.append(p.requires_grad)
            p.requires_grad_(False)
        optimizer._grad_modes.append(self)

    @staticmethod
    def _unsupported(holders: list[tuple[nn.Module, str]], functional: set[int]) -> str | None:
        if not holders:
            return "not a parameter of the model"
        for module, pname in holders:
            if type(module).forward not in _INPUT_READERS:
                return f"held by {type(module).__name__}, which is not handled"
            if pname != "weight":
                return f"the {pname!r} of {type(module).__name__}, not its weight"
            if id(module) in functional:
                return "its module is used functionally by its parent (e.g. nn.MultiheadAttention)"
        return None

    def _anchor(self, device: torch.device) -> Tensor:
        # A zero leaf that requires grad, added to an output that would otherwise not require
        # grad (a first layer whose input and parameters are all frozen), so δY is computed.
        anchor = self._anchors.get(device)
        if anchor is None:
            anchor = self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return anchor

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor, *,
                    p: Tensor, group_index: int, name: str, reader: Callable[..., Tensor]) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        inputs = reader(args, kwargs)
        replaced = None
        if not output.requires_grad:
            output = replaced = output + self._anchor(output.device)
        # A list, so the backward hook can release X as soon as it has used it.
        holder = [inputs]
        output.register_hook(functools.partial(
            self._on_output_grad, holder=holder, version=inputs._version, p=p, group_index=group_index, name=name))
        return replaced

    @torch.no_grad()
    def _on_output_grad(self, output_grads: Tensor, *, holder: list[Tensor], version: int, p: Tensor,
                        group_index: int, name: str) -> None:
        if not holder:
            raise RuntimeError(
                f"{name}: its activation-side gradient was already taken for this forward; a second backward "
                "through the same graph (retain_graph=True) is not supported while the model is attached")
        inputs = holder.pop()
        if inputs._version != version:
            raise RuntimeError(
                f"{name}: the layer's input was modified in place after the forward; its weight gradient "
                "would be wrong (autograd raises for the same reason when the weight requires grad)")
        optimizer = self._optimizer
        group = optimizer.param_groups[group_index]
        state = optimizer._state(p, group)
        projection, A, B = accumulation.factors_for_piece(state, group)
        x_rows = inputs.reshape(-1, inputs.shape[-1])
        grad_rows = output_grads.reshape(-1, output_grads.shape[-1])
        if x_rows.dtype != A.dtype:
            x_rows = x_rows.to(A.dtype)
        if grad_rows.dtype != A.dtype:
            grad_rows = grad_rows.to(A.dtype)
        grad_A, grad_B = projection.project_activations(x_rows, grad_rows, A, B, optimizer._scale(group))
        accumulation.add_piece_(state, grad_A, grad_B)

    def after_step(self) -> None:
        """Called by ``step()``: drop the anchors' (meaningless) gradients."""
        for anchor in self._anchors.values():
            anchor.grad = None

    def after_zero_grad(self, set_to_none: bool) -> None:
        """Called by ``zero_grad()``: as :meth:`after_step`."""
        self.after_step()

    def detach(self) -> None:
        """Remove the hooks and restore ``requires_grad`` of the attached weights."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for p, requires_grad in zip(self._params, self._requires_grad):
            p.requires_grad_(requires_grad)
        self._params.clear()
        self._requires_grad.clear()
        if self in self._optimizer._grad_modes:
            self._optimizer._grad_modes.remove(self)

    remove = detach

    def __enter__(self) -> ActivationSide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"ActivationSide(attached={len(self.attached)}, fallback={len(self.fallback)})"
