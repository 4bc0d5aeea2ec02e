"""Interop with PEFT and Transformers: adapters out and in, unmerge, task switching.

* :func:`export_peft_adapter`: the optimizer's change of a model as a PEFT LoRA adapter
  directory (exact factors where they are known, a truncated SVD otherwise), with a report of
  what each module keeps (:mod:`lora_optim.interop.peft_adapter`);
* :func:`load_peft_adapter`: merge a PEFT adapter and continue training from its factors;
* :func:`unmerge_`: put the weights back to their base (:mod:`lora_optim.interop.unmerge`).

Everything here goes through the optimizer's public surface (``param_groups``, ``state``,
:meth:`~lora_optim.LoRAAdam.learnt_change` (the one record of ``W − W_base``,
:mod:`lora_optim.learnt_change`), :meth:`~lora_optim.LoRAAdam.factor_scale`,
:meth:`~lora_optim.LoRAAdam.has_pending_pieces`, :meth:`~lora_optim.LoRAAdam.set_factors`,
:meth:`~lora_optim.LoRAAdam.merge_factors`); module names are written as PEFT reads them
(:mod:`lora_optim.interop.patterns`). The recipes, including ``transformers.Trainer``, and the
table of what is exact, what is a truncated SVD and what is refused are in ``docs/interop.md``.
"""

from lora_optim.interop.peft_adapter import (
    AdapterExport,
    AdapterImport,
    ModuleExport,
    export_peft_adapter,
    load_peft_adapter,
)
from lora_optim.interop.unmerge import unmerge_

__all__ = [
    "export_peft_adapter",
    "load_peft_adapter",
    "unmerge_",
    "AdapterExport",
    "AdapterImport",
    "ModuleExport",
]
