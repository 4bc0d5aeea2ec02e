"""The names of the per-parameter optimizer state, in one place.

``LoRAAdam.state[p]`` is a dict with string keys; every module that reads or writes it uses the
names below, so a key is renamed or added in one place. Values are tensors or plain ints, so a
state dict loads with ``torch.load(..., weights_only=True)``. Counters that a step advances
(skips, ``random``'s draws, stochastic rounding's writes) are 0-dim int64 tensors on the
parameter's device, so that the step advances them on the device, only where it is taken.

Every parameter:
    :data:`STEP` (a 0-dim float32 tensor on the parameter's device, as ``torch.optim.AdamW``
    keeps it: the fused Adam kernels read it) and :data:`NONFINITE_SKIPS` (a 0-dim int64 tensor).
Dense parameters (``rank=None`` groups, vectors):
    :data:`EXP_AVG`, :data:`EXP_AVG_SQ` (the parameter's shape and dtype).
Low-rank parameters:
    :data:`RANK`, :data:`SEED` (ints), the moments of each factor (:data:`MOMENT_KEYS`), the
    factors :data:`FACTOR_A`, :data:`FACTOR_B` where the projection stores them, the
    projection's own keys (e.g. :data:`DRAWS`, :data:`AGE` for ``random``), the sparsity mask
    (:data:`SPARSITY_MASK`, groups with ``preserve_sparsity=True``), the write mode's keys
    (:data:`WEIGHT_COMPENSATION`, :data:`ROUNDING_SEED`, :data:`ROUNDING_DRAWS`), the drift
    probe (:data:`DRIFT_KEYS`), the divergence guard (:data:`STEP_SIZE_KEYS`), the record of the
    initial factors (:data:`INITIAL_KEYS`) and,
    between a backward and ``step()`` in the per-layer and activation-side modes, the
    projected-gradient sums (:data:`ACCUMULATOR_KEYS`).
"""

from __future__ import annotations

__all__ = [
    "STEP",
    "NONFINITE_SKIPS",
    "EXP_AVG",
    "EXP_AVG_SQ",
    "RANK",
    "SEED",
    "FACTOR_A",
    "FACTOR_B",
    "EXP_AVG_A",
    "EXP_AVG_SQ_A",
    "EXP_AVG_B",
    "EXP_AVG_SQ_B",
    "MOMENT_KEYS",
    "DRAWS",
    "AGE",
    "GRADIENT_INIT_PENDING",
    "REFRESHES",
    "SPARSITY_MASK",
    "WEIGHT_COMPENSATION",
    "ROUNDING_SEED",
    "ROUNDING_DRAWS",
    "DRIFT_PROBES",
    "DRIFT_REFERENCE",
    "DRIFT_CHANGE",
    "DRIFT_KEYS",
    "ACCUMULATED_GRAD_A",
    "ACCUMULATED_GRAD_B",
    "ACCUMULATION",
    "ACCUMULATOR_KEYS",
    "ROW_SHARDED_KEYS",
    "ROW_OFFSET",
    "GLOBAL_ROWS",
    "INITIAL_FACTORS",
    "INITIAL_A",
    "INITIAL_B",
    "INITIAL_KEYS",
    "STEP_SIZE_REFERENCE",
    "STEP_SIZE_LARGEST",
    "STEP_SIZE_LAST",
    "STEP_SIZE_KEYS",
]

#: Adam updates taken (0-dim float32 tensor on the parameter's device).
STEP = "step"
#: Steps skipped because of a NaN/Inf (0-dim int64 tensor on the parameter's device).
NONFINITE_SKIPS = "nonfinite_skips"

#: Moments of a densely trained parameter.
EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"

#: Effective rank ``min(rank, out, in)`` and the parameter's int seed.
RANK, SEED = "rank", "seed"
#: The stored factors ``A`` (out×r) and ``B`` (r×in), in the factor dtype.
FACTOR_A, FACTOR_B = "A", "B"
#: Adam moments of each factor.
EXP_AVG_A, EXP_AVG_SQ_A = "exp_avg_A", "exp_avg_sq_A"
EXP_AVG_B, EXP_AVG_SQ_B = "exp_avg_B", "exp_avg_sq_B"
MOMENT_KEYS = {"A": (EXP_AVG_A, EXP_AVG_SQ_A), "B": (EXP_AVG_B, EXP_AVG_SQ_B)}

#: ``random``: draws made so far, and steps taken on the current draw (0-dim int64 tensors);
#: ``svd``: steps attempted on the current basis (an int).
DRAWS, AGE = "draws", "age"

# --- inits, svd projection and sparsity (issue 11) ---
#: ``lora`` with ``init="gradient"``: ``1`` until the first step has taken the factors from ``G`` (int).
GRADIENT_INIT_PENDING = "gradient_init_pending"
#: ``svd``: the number of basis refreshes made (int); the steps taken on the current basis are :data:`AGE`.
REFRESHES = "refreshes"
#: ``preserve_sparsity=True``: the mask ``M = [W₀ ≠ 0]`` packed 8 columns per byte (uint8, ``out×⌈in/8⌉``).
SPARSITY_MASK = "sparsity_mask"
# --- end issue 11 ---

#: ``compensated`` writes: the Kahan buffer (``W``'s shape and dtype).
WEIGHT_COMPENSATION = "weight_compensation"
#: ``stochastic`` writes: the rounding stream's int seed and the number of writes so far (a 0-dim
#: int64 tensor).
ROUNDING_SEED, ROUNDING_DRAWS = "rounding_seed", "rounding_draws"

#: Drift probe (fp64): probes ``X`` (in×k), ``W₀X`` (out×k) and the summed exact change (out×k).
DRIFT_PROBES, DRIFT_REFERENCE, DRIFT_CHANGE = "drift_probes", "drift_reference", "drift_change"
DRIFT_KEYS = (DRIFT_PROBES, DRIFT_REFERENCE, DRIFT_CHANGE)

#: Per-layer and activation-side modes: the sums of the projected gradient pieces (unscaled by
#: ``s``, in the factor dtype) and the int status of the sums (see :mod:`lora_optim.accumulation`).
ACCUMULATED_GRAD_A, ACCUMULATED_GRAD_B = "accumulated_grad_A", "accumulated_grad_B"
ACCUMULATION = "accumulation"
ACCUMULATOR_KEYS = (ACCUMULATED_GRAD_A, ACCUMULATED_GRAD_B, ACCUMULATION)

#: The factors the weight's base excludes (:mod:`lora_optim.initial_factors`): an int status
#: (absent: unknown) and, with ``keep_initial_factors``, copies of ``A₀`` and ``B₀`` (factor dtype).
INITIAL_FACTORS, INITIAL_A, INITIAL_B = "initial_factors", "initial_A", "initial_B"
INITIAL_KEYS = (INITIAL_FACTORS, INITIAL_A, INITIAL_B)

#: The divergence guard (:mod:`lora_optim.divergence`): the reference of the step-size estimate
#: (``(4,)``: the projection's coefficients over ``‖W₀‖_F²``), and the squares of the largest and of
#: the latest relative step ``s·‖ΔW‖/‖W₀‖`` (0-dim), in the factor dtype on the parameter's device.
STEP_SIZE_REFERENCE, STEP_SIZE_LARGEST, STEP_SIZE_LAST = "step_size_reference", "step_size_largest", "step_size_last"
STEP_SIZE_KEYS = (STEP_SIZE_REFERENCE, STEP_SIZE_LARGEST, STEP_SIZE_LAST)

#: Keys of tensors with one row per row of ``W``: sharded with ``W`` when it is sharded by rows
#: (FSDP2); a projection adds its own in ``Projection.row_sharded_keys``.
ROW_SHARDED_KEYS = (FACTOR_A, EXP_AVG_A, EXP_AVG_SQ_A, WEIGHT_COMPENSATION, DRIFT_REFERENCE, DRIFT_CHANGE,
                    ACCUMULATED_GRAD_A, SPARSITY_MASK, INITIAL_A)

#: Not stored: on a row-sharded weight the engine shows projections this rank's view of the
#: state, with the global index of its first row and the weight's global row count (ints).
ROW_OFFSET, GLOBAL_ROWS = "row_offset", "global_rows"
