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
* registers a forward hook that keeps the layer's input ``X`` and returns the output through a
  *tap*: an autograd function of ``(Y, a)``, with ``a`` a fresh zero scalar leaf that requires
  grad, whose result ``Y'`` shares ``Y``'s memory (no copy, no arithmetic) but is a tensor of
  the mode's own, so changing it in place later (``nn.ReLU(inplace=True)``, ``y += 1``, in-place
  dropout) leaves the tap, and the gradient it receives, intact;
* takes ``δY`` in the tap's backward (which passes it on unchanged and gives ``a`` a zero
  gradient), and adds the factor gradients to the step's sums
  (:meth:`LoRAAdam.accumulate_activation_grad_ <lora_optim.LoRAAdam.accumulate_activation_grad_>`,
  :mod:`lora_optim.accumulation`) only when autograd accumulates into the leaf ``a``, which
  happens exactly when a plain backward would accumulate into ``W.grad``: ``loss.backward()``,
  but not ``torch.autograd.grad(loss, x)`` or ``loss.backward(inputs=[x])``. Then ``X`` is
  released.

The extra cost is one autograd node per layer call and a zero scalar in the backward: no
output-sized tensor is made and nothing is reduced.

A layer called several times in one forward (weight sharing) adds one piece per call, and
micro-batches add up until ``opt.step()``, which steps through the same engine as the plain
mode with the sums in place of ``G`` (exact: the factors do not change before the step), so
``nonfinite="raise"``, ``torch.amp.GradScaler`` (its scale is divided out at the step), LR
schedulers and checkpoints between micro-batches behave as in the plain mode.
``opt.zero_grad()`` discards the sums as it discards ``p.grad``. Other parameters are
untouched: biases, dense groups and low-rank weights of layers this mode cannot handle keep the
``G`` path; the latter are listed in a warning.

Non-finite values: ``G`` never exists, so the check of the ``nonfinite`` option is made on the
summed factor gradients at ``step()`` (a NaN or Inf in ``X`` or ``δY`` reaches them through the
products): the parameter is skipped, or ``step()`` raises before changing anything.

Data parallelism: under ``DistributedDataParallel``, attach the model *before* wrapping it (the
attached weights then do not require grad, so DDP leaves them out); each rank forms the factor
gradients of its own batch, and ``step()`` averages them over the ranks first, in one
all-reduce of ``r·(out+in)`` values per matrix instead of DDP's ``out·in``
(:meth:`LoRAAdam.reduce_projected_grads_ <lora_optim.LoRAAdam.reduce_projected_grads_>`). The
group is the default process group, or the ``process_group`` given to ``attach``. Under FSDP2
(attach after ``fully_shard``), each rank forms the whole factor gradients of its batch with the
whole factors (an all-gather of ``A``, ``out×r``, per layer use), the step averages them and
keeps this rank's rows: FSDP2 all-gathers ``W`` for the forward but no gradient of ``W`` is
formed or reduce-scattered (:mod:`lora_optim.distributed`).

Handled: ``nn.Linear`` (and subclasses that keep its ``forward``), called through the module.
Falling back to ``G``: other layer types (convolutions, embeddings), weights shared with such a
layer (tied embeddings), weights of ``nn.MultiheadAttention`` (it reads ``out_proj.weight``
without calling the module). A weight that the model also uses outside its module's ``forward``
(``F.linear(x, layer.weight)``) cannot be seen by module hooks: do not attach such a model.
Each forward's input ``X`` is kept until its backward as a saved tensor, as autograd keeps it for
``W``'s gradient: activation checkpointing (``torch.utils.checkpoint``, non-reentrant; Hugging
Face's ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``)
frees and recomputes it, a second backward through the same graph (``retain_graph=True``) adds
its pieces again as a plain backward adds to ``W.grad``, and ``X`` must not be modified in place
between forward and backward (checked, as autograd checks it).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lora_optim.distributed import data_parallel_group, is_dtensor, row_shard
from lora_optim.projections import get_projection

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


class _Piece:
    """One call of an attached layer: its name, and ``X`` and ``δY`` between the tap's backward and
    the anchor's accumulation."""

    __slots__ = ("name", "inputs", "output_grads")

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs: Tensor | None = None
        self.output_grads: Tensor | None = None


class _OutputTap(torch.autograd.Function):
    """``Y' = Y`` with ``X`` kept for the backward and ``δY`` taken on the way back (see the module
    docstring).

    The forward returns an alias of ``Y`` (``Y.detach()``: same memory, not a view in autograd's
    sense), so ``Y'`` has this node as its own history and may be changed in place later. ``X`` is
    kept as a saved tensor, as a linear layer keeps it for its weight's gradient: activation
    checkpointing frees and recomputes it, a second backward (``retain_graph=True``) finds it
    again, and a change of ``X`` in place after the forward is caught. The backward hands ``X``
    and ``δY`` to the call's piece, passes ``δY`` on to ``Y`` unchanged, and gives the anchor a
    zero gradient, whose accumulation then hands the piece to the optimizer."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor, inputs: Tensor, piece: _Piece) -> Tensor:
        ctx.piece = piece
        ctx.save_for_backward(inputs)
        return output.detach()

    @staticmethod
    def backward(ctx: Any, output_grads: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        piece = ctx.piece
        try:
            (inputs,) = ctx.saved_tensors
        except RuntimeError as error:
            if "inplace" not in str(error):
                raise
            raise RuntimeError(
                f"{piece.name}: the layer's input was modified in place after the forward; its weight gradient "
                "would be wrong (autograd raises for the same reason when the weight requires grad)") from error
        piece.inputs, piece.output_grads = inputs, output_grads  # the anchor's accumulation comes right after
        return (output_grads if ctx.needs_input_grad[0] else None), output_grads.new_zeros(()), None, None


class ActivationSide:
    """Handle of the activation-side mode of a :class:`~lora_optim.LoRAAdam` on one model.

    Made by :meth:`LoRAAdam.attach` (see the module docstring). ``detach()`` (alias
    ``remove()``, or leaving a ``with`` block) takes the hooks off and restores
    ``requires_grad``; sums not yet stepped stay in the optimizer state for ``step()``.

    Args:
        optimizer: the optimizer whose low-rank ``nn.Linear`` weights are handled.
        model: the model (not yet wrapped in ``DistributedDataParallel``).
        process_group: in a data-parallel run, the group over which the factor gradients are
            averaged at ``step()``; ``None`` means the default group when one of more than one
            rank is initialized.

    Attributes:
        attached: names (as in ``model.named_parameters()``) of the weights handled here.
        fallback: ``{name: reason}`` of the low-rank parameters left on the ``G`` path.
    """

    def __init__(self, optimizer: LoRAAdam, model: nn.Module, process_group: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach expects an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("attach the model before wrapping it in DistributedDataParallel: the attached weights "
                            "get no gradient, and DDP must leave them out (it does for parameters that do not "
                            "require grad when it is built)")
        self._optimizer = optimizer
        self._process_group = process_group
        taken = {id(p) for mode in optimizer.grad_modes if isinstance(mode, ActivationSide) for p in mode.params}
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
        plan: list[tuple[nn.Module, Tensor, str]] = []
        position = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                position += 1
                if not optimizer.is_low_rank(p):
                    continue
                name = names.get(id(p), f"<parameter {position - 1} of the optimizer, not in the model>")
                if id(p) in taken:
                    raise ValueError(f"{name} is already attached by another attach() handle of this optimizer")
                if not p.requires_grad:  # frozen: the plain mode would not train it either
                    continue
                reason = self._unsupported(holders.get(id(p), []), functional) or self._unshardable(optimizer, p)
                if reason is not None:
                    self.fallback[name] = reason
                    continue
                for module in {id(module): module for module, _ in holders[id(p)]}.values():
                    plan.append((module, p, name))
                self.attached.append(name)
                self._params.append(p)
        if self.fallback:
            listing = "; ".join(f"{name} ({reason})" for name, reason in self.fallback.items())
            warnings.warn(f"attach: {len(self.fallback)} low-rank parameter(s) keep the full-gradient (G) path: "
                          f"{listing}", stacklevel=3)
        for module, p, name in plan:
            reader = _INPUT_READERS[type(module).forward]
            hook = functools.partial(self._on_forward, p=p, name=name, reader=reader)
            self._hooks.append(module.register_forward_hook(hook, with_kwargs=True))
        for p in self._params:
            self._requires_grad.append(p.requires_grad)
            p.requires_grad_(False)
        self._registration = optimizer.register_grad_mode(self)

    @property
    def params(self) -> tuple[Tensor, ...]:
        """The attached weights."""
        return tuple(self._params)

    @staticmethod
    def _unshardable(optimizer: LoRAAdam, p: Tensor) -> str | None:
        if not is_dtensor(p):
            return None
        try:
            row_shard(p)
        except ValueError as error:
            return str(error)
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        if not get_projection(group["projection"]).supports_row_sharding:
            return f"sharded by FSDP2, and projection {group['projection']!r} does not support row-sharded weights"
        return None

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

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor, *,
                    p: Tensor, name: str, reader: Callable[..., Tensor]) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        piece = _Piece(name)
        # A fresh leaf per call: autograd accumulates into it exactly when a plain backward would
        # accumulate into W.grad (not for autograd.grad(loss, x) or backward(inputs=[x])).
        anchor = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        anchor.register_post_accumulate_grad_hook(functools.partial(self._on_accumulate, piece=piece, p=p))
        # X detached: the tap keeps it without an edge into X's history (δX flows through the layer).
        return _OutputTap.apply(output, anchor, reader(args, kwargs).detach(), piece)

    @torch.no_grad()
    def _on_accumulate(self, anchor: Tensor, *, piece: _Piece, p: Tensor) -> None:
        anchor.grad = None
        inputs, output_grads = piece.inputs, piece.output_grads
        piece.inputs = piece.output_grads = None  # release X and δY
        if inputs is None or output_grads is None:
            return  # no gradient reached the layer's output (its node was not run)
        self._optimizer.accumulate_activation_grad_(p, inputs, output_grads)

    def before_step(self) -> None:
        """In a data-parallel run, average the factor gradients over the ranks (one all-reduce)."""
        group = data_parallel_group(self._process_group)
        if group is not None and self._params:
            self._optimizer.reduce_projected_grads_(self._params, group)

    def after_zero_grad(self, set_to_none: bool) -> None:
        """Nothing to reset: the sums are the optimizer's, and ``zero_grad`` resets them."""

    def detach(self) -> None:
        """Remove the hooks and restore ``requires_grad`` of the attached weights."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for p, requires_grad in zip(self._params, self._requires_grad):
            p.requires_grad_(requires_grad)
        self._params.clear()
        self._requires_grad.clear()
        self._registration.remove()

    remove = detach

    def __enter__(self) -> ActivationSide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"ActivationSide(attached={len(self.attached)}, fallback={len(self.fallback)})"
