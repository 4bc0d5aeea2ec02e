"""lora_optim: LoRA on the optimizer side.

``LoRAAdam(model.parameters(), rank=8)`` trains a low-rank update of every weight matrix from
its full gradient, keeping Adam state only for the factors, without touching the model.
"""

from lora_optim.activation import ActivationSide
from lora_optim.divergence import DivergenceWarning, StepSizeReport
from lora_optim.drift import DriftReport
from lora_optim.grad_mode import GradMode
from lora_optim.interop import export_peft_adapter, load_peft_adapter, unmerge_
from lora_optim.learnt_change import LearntChange
from lora_optim.memory import optimizer_state_bytes
from lora_optim.nonfinite import NonFiniteGradientError, NonFiniteGradientWarning
from lora_optim.optimizer import LoRAAdam
from lora_optim.options import Option
from lora_optim.per_layer import PerLayerStep
from lora_optim.precision import available_writers
from lora_optim.projections import (
    FactorChange,
    Projection,
    available_projections,
    get_projection,
    register_projection,
    unregister_projection,
)

__all__ = [
    "LoRAAdam",
    "PerLayerStep",
    "ActivationSide",
    "GradMode",
    "Projection",
    "FactorChange",
    "Option",
    "register_projection",
    "unregister_projection",
    "get_projection",
    "available_projections",
    "available_writers",
    "optimizer_state_bytes",
    "DriftReport",
    "StepSizeReport",
    "DivergenceWarning",
    "LearntChange",
    "NonFiniteGradientWarning",
    "NonFiniteGradientError",
    # interop with PEFT (lora_optim.interop)
    "export_peft_adapter",
    "load_peft_adapter",
    "unmerge_",
]

__version__ = "0.1.0"
