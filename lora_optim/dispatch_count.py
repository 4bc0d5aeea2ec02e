"""Counting what a block of torch code asks of a device: aten ops and host syncs.

On an accelerator an optimizer step over many small matrices costs kernel launches and
device-to-host syncs more than arithmetic; CPU wall time says little about either. A
:class:`DispatchCounter` (a ``TorchDispatchMode``) sees every aten op below autograd, views
included, so the shape of a step is measured on any device, the CPU included::

    with DispatchCounter() as counter:
        optimizer.step()
    print(counter.total, counter.launches, counter.syncs)

A *sync* is an op that reads a device value on the host: ``_local_scalar_dense`` (``.item()``,
``bool(t)``, ``float(t)``), ``is_nonzero``, ``nonzero``, ``equal``, or a copy to the CPU (the
library reads its one check per step with ``.to("cpu", copy=True)``, which dispatches even on
the CPU). ``Tensor.tolist()`` on a CPU tensor does not dispatch, so it is invisible here.
"""

from __future__ import annotations

import collections
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DispatchCounter", "SYNC_OPS", "VIEW_OPS"]

#: Ops that read a device value on the host.
SYNC_OPS = frozenset({"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default",
                      "aten.nonzero.default", "aten.equal.default"})

#: Ops that only make a new view of existing memory: no kernel runs on a device.
VIEW_OPS = frozenset({"aten.t.default", "aten.transpose.int", "aten.view.default", "aten.slice.Tensor",
                      "aten.unsqueeze.default", "aten.expand.default", "aten.as_strided.default", "aten.alias.default",
                      "aten.detach.default", "aten.unflatten.int", "aten._unsafe_view.default", "aten.permute.default",
                      "aten.select.int", "aten.split.Tensor", "aten.split_with_sizes.default"})


class DispatchCounter(TorchDispatchMode):
    """Counts aten ops by name, and host syncs, while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        #: ``{op name: calls}``.
        self.ops: collections.Counter[str] = collections.Counter()
        #: Device-to-host reads.
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        self.ops[name] += 1
        if name in SYNC_OPS or (name.startswith("aten._to_copy") and str(kwargs.get("device", "")) == "cpu"):
            self.syncs += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """Every aten op (profiler markers aside)."""
        return sum(count for name, count in self.ops.items() if not name.startswith("profiler."))

    @property
    def launches(self) -> int:
        """Aten ops that run a kernel: :attr:`total` less the views."""
        return self.total - sum(self.ops[name] for name in VIEW_OPS)
