"""Which PEFT LoRA layer expresses a weight, and how our factors map onto its tensors.

The optimizer trains the matrix view ``W`` (``out×in``, :mod:`lora_optim.matrix`) of a weight with
``W = W_base + s·L·R`` (``L`` is ``out×k``, ``R`` is ``k×in``). PEFT keeps, per adapted module:

* ``nn.Linear``: ``lora_A.weight = R`` (``k×in``) and ``lora_B.weight = L`` (``out×k``); PEFT's
  change of the weight is ``s·lora_B·lora_A``;
* ``nn.Conv1d/2d/3d``: the same, reshaped to ``lora_A.weight`` ``(k, in, *kernel)`` (a
  convolution with the layer's kernel, stride and padding) and ``lora_B.weight``
  ``(out, k, 1, …)`` (a 1×1 convolution); the matrix view of the kernel is ``(out, in·∏kernel)``;
* ``nn.Embedding`` (``num_embeddings×embedding_dim``): ``lora_embedding_A = Lᵀ``
  (``k×num_embeddings``) and ``lora_embedding_B = Rᵀ`` (``embedding_dim×k``); PEFT's change is
  ``s·(lora_embedding_B·lora_embedding_A)ᵀ``;

so our ``A`` is PEFT's ``lora_B`` (and, for embeddings, the transposes swap). A weight PEFT would
not reproduce faithfully raises ``ValueError`` naming it: a weight that is not a module's
``weight``, other module types (transformers' ``Conv1D`` needs ``fan_in_fan_out``, transposed
convolutions, ``nn.MultiheadAttention``'s projections, which it reads without calling the
modules), convolutions with ``groups > 1``, a dilation or a padding mode other than zeros (PEFT's
``lora_A`` convolution has none of them), and embeddings with ``max_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["PeftLayer", "peft_layer", "ADAPTER_PREFIX"]

#: Prefix of every key in a PEFT adapter file (``PeftModel`` → ``LoraModel`` → the base model).
ADAPTER_PREFIX = "base_model.model."

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class PeftLayer:
    """How PEFT stores ``s·L·R`` for the weight of one module.

    Attributes:
        module_name: the module's name in ``model.named_modules()`` (PEFT's target name).
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        weight_shape: the weight's shape.
    """

    module_name: str
    kind: str
    weight_shape: tuple[int, ...]

    @property
    def keys(self) -> tuple[str, str]:
        """Adapter-file keys of PEFT's ``A`` and ``B`` tensors for this module."""
        stem = ADAPTER_PREFIX + self.module_name
        if self.kind == "embedding":
            return f"{stem}.lora_embedding_A", f"{stem}.lora_embedding_B"
        return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"

    def to_peft(self, L: Tensor, R: Tensor) -> dict[str, Tensor]:
        """PEFT's tensors (keyed as in the adapter file) for the change ``s·L·R`` of the matrix view."""
        key_A, key_B = self.keys
        rank = L.shape[1]
        if self.kind == "embedding":
            return {key_A: L.t().contiguous(), key_B: R.t().contiguous()}
        if self.kind == "conv":
            kernel = self.weight_shape[2:]
            return {key_A: R.reshape(rank, self.weight_shape[1], *kernel).contiguous(),
                    key_B: L.reshape(self.weight_shape[0], rank, *(1,) * len(kernel)).contiguous()}
        return {key_A: R.contiguous(), key_B: L.contiguous()}

    def from_peft(self, tensor_A: Tensor, tensor_B: Tensor) -> tuple[Tensor, Tensor]:
        """``(L, R)`` of the matrix view from PEFT's ``A`` and ``B`` tensors; ``ValueError`` on a
        shape that does not fit the weight."""
        out_features = self.weight_shape[0]
        in_features = 1
        for size in self.weight_shape[1:]:
            in_features *= size
        if self.kind == "embedding":
            L, R = tensor_A.t(), tensor_B.t()
        else:
            L, R = tensor_B.reshape(tensor_B.shape[0], -1), tensor_A.reshape(tensor_A.shape[0], -1)
        if L.ndim != 2 or R.ndim != 2 or L.shape[0] != out_features or R.shape[1] != in_features \
                or L.shape[1] != R.shape[0]:
            raise ValueError(
                f"the adapter's tensors for {self.module_name!r} have shapes {tuple(tensor_A.shape)} and "
                f"{tuple(tensor_B.shape)}, which do not fit its weight of shape {self.weight_shape}"
            )
        return L, R


def peft_layer(module_name: str, module: nn.Module, parameter_name: str, parent: nn.Module | None = None) -> PeftLayer:
    """The :class:`PeftLayer` of ``module``'s parameter ``parameter_name``, or ``ValueError`` saying
    why PEFT cannot express a low-rank change of it (``parent`` is the module that holds
    ``module``, if any)."""
    where = f"{module_name}.{parameter_name}" if module_name else parameter_name
    kind_name = type(module).__name__
    if parameter_name != "weight":
        raise ValueError(f"{where}: PEFT's LoRA adapts a module's 'weight'; a low-rank {parameter_name!r} of a "
                         f"{kind_name} cannot be written as an adapter (train it with rank=None instead)")
    if not module_name:
        raise ValueError(f"{where}: the weight belongs to the root module; PEFT adapts named submodules")
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(f"{where}: nn.MultiheadAttention reads its projections' weights without calling them, so "
                         "a PEFT adapter on this layer would not change the outputs")
    shape = tuple(module.weight.shape)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ValueError(f"{where}: an nn.Embedding with max_norm renormalises its rows; PEFT's LoRA embedding "
                             "would renormalise the adapter's instead")
        return PeftLayer(module_name, "embedding", shape)
    if isinstance(module, _CONVOLUTIONS):
        if module.groups != 1 or any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
            raise ValueError(
                f"{where}: PEFT's LoRA convolution has no groups, dilation or padding mode, so it cannot express this "
                f"{kind_name} (groups={module.groups}, dilation={module.dilation}, "
                f"padding_mode={module.padding_mode!r})"
            )
        return PeftLayer(module_name, "conv", shape)
    if isinstance(module, nn.Linear):
        return PeftLayer(module_name, "linear", shape)
    hint = " (transformers' Conv1D stores W transposed: PEFT needs fan_in_fan_out)" if kind_name == "Conv1D" else ""
    raise ValueError(f"{where}: PEFT's LoRA supports nn.Linear, nn.Conv1d/2d/3d and nn.Embedding here, not "
                     f"{kind_name}{hint}; train it with rank=None, or leave it out of the export")
