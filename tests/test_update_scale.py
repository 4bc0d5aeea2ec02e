"""``update_scale="matched"`` (:mod:`lora_optim.update_scale`): the derivation of each projection's
first step, the expected first-step ``‖ΔW‖_F²`` equal to ``lora``'s across projections (checked
statistically over fixed seeds), and that ``matched`` is ``plain`` with ``alpha`` times ``c_P``.

Tolerances. Each check compares sample means over ``N`` fixed seeds; the allowance is
``Z = 4`` standard errors of the sample (its own standard deviation over ``√N``) plus the
relative size of the terms the derivation leaves out (:meth:`Projection.first_step_norm_sq`):
the correlation of Adam's signs with the fixed factor, ``≈ (2/π)(r−1)/min(out, in)`` (doubled
here), and ``s·dA·dB`` (``η²r``, negligible at ``η = 10⁻³``). Without the multiplier the
projections differ by ``√(6·in/r)`` (about 10× at these shapes), far outside the allowance.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam
from lora_optim.projections import get_projection
from lora_optim.update_scale import update_multiplier

PROJECTIONS = ("lora", "random", "additive", "svd")
SHAPES = ((192, 128), (128, 192))  # both svd sides; random/additive/lora with out ≠ in
RANK, ALPHA, LR, SEEDS, Z = 4, 8.0, 1e-3, 32, 4.0


def _allowance(shape) -> float:
    """The left-out terms' relative size (doubled), see the module docstring."""
    return 2 * (2 / math.pi) * (RANK - 1) / min(shape) + LR**2 * RANK


def _first_steps(projection: str, shape, update_scale: str) -> list[float]:
    """``‖ΔW₁‖_F² / η²`` of the first step over :data:`SEEDS` seeds (optimizer seed and gradient)."""
    values = []
    for seed in range(SEEDS):
        gen = torch.Generator().manual_seed(10_000 + seed)
        weight = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05)
        opt = LoRAAdam([weight], rank=RANK, alpha=ALPHA, lr=LR, projection=projection, seed=seed,
                       update_scale=update_scale, divergence_threshold=None)
        weight.grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        before = weight.detach().clone()
        opt.step()
        values.append(torch.linalg.vector_norm(weight.detach() - before).item() ** 2 / LR**2)
    return values


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_first_step_matches_its_derivation(projection, shape):
    """Plain scale: the mean ``‖ΔW₁‖_F²/(s·η)²`` is ``first_step_norm_sq(out, in, r)``."""
    scale = ALPHA / RANK
    mean, error = _mean_and_error([v / scale**2 for v in _first_steps(projection, shape, "plain")])
    expected = get_projection(projection).first_step_norm_sq(*shape, RANK)
    assert abs(mean / expected - 1) <= Z * error / expected + _allowance(shape), (mean, expected, error)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("projection", ["random", "additive", "svd"])
def test_matched_first_step_equals_loras(projection, shape):
    """The issue's test: with ``update_scale="matched"`` the expected ``‖ΔW₁‖_F²`` of every projection
    equals ``lora``'s at the same ``lr`` and ``alpha`` (and without it, it does not)."""
    lora_mean, lora_error = _mean_and_error(_first_steps("lora", shape, "matched"))
    mean, error = _mean_and_error(_first_steps(projection, shape, "matched"))
    tolerance = Z * math.hypot(error / mean, lora_error / lora_mean) + 2 * _allowance(shape)
    assert abs(mean / lora_mean - 1) <= tolerance, (mean / lora_mean, tolerance)
    plain = statistics.fmean(_first_steps(projection, shape, "plain"))
    assert plain / lora_mean > 2.5  # at least √3·√3 apart (svd), ~100× for random/additive


def test_multipliers_in_closed_form():
    lora, random_, additive, svd = (get_projection(name) for name in PROJECTIONS)
    assert update_multiplier(lora, 384, 1536, 8) == 1.0
    for projection in (random_, additive):
        assert update_multiplier(projection, 384, 1536, 8) == pytest.approx(math.sqrt(8 / (6 * 1536)))
        assert update_multiplier(projection, 1536, 384, 8) == pytest.approx(math.sqrt(8 / (6 * 384)))
    assert update_multiplier(svd, 1536, 384, 8) == pytest.approx(math.sqrt(1 / 3))  # right side
    assert update_multiplier(svd, 384, 1536, 8) == pytest.approx(math.sqrt(384 / (3 * 1536)))  # left side


def _model(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return model, torch.randn(32, 12, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)


def _train(model, opt, x, y, steps=6):
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("projection,options", [("lora", {}), ("random", {"resample_every": 2}), ("additive", {}),
                                                ("additive", {"remap_every": 2}), ("svd", {"refresh_every": 3})],
                         ids=str)
def test_matched_is_plain_with_alpha_times_c_per_matrix(projection, options):
    """One ``matched`` group over matrices of three shapes (batched by scale) takes the same steps as
    ``plain`` groups of one matrix each with ``alpha·c_P`` of its shape, to float rounding
    (``(alpha·c)/r`` and ``(alpha/r)·c`` may differ in the last bit; ``svd``'s basis amplifies it)."""
    common = dict(rank=3, lr=0.01, projection=projection, seed=4, **options)
    model, x, y = _model()
    matrices = [m.weight for m in model if isinstance(m, nn.Linear)]
    others = [p for p in model.parameters() if all(p is not w for w in matrices)]
    opt = LoRAAdam([{"params": matrices, "alpha": 6.0, "update_scale": "matched"},
                    {"params": others, "rank": None}], **common)
    scales = [opt.factor_scale(w) for w in matrices]
    matched = _train(model, opt, x, y)

    model, x, y = _model()
    matrices = [m.weight for m in model if isinstance(m, nn.Linear)]
    others = [p for p in model.parameters() if all(p is not w for w in matrices)]
    groups = [{"params": [w], "alpha": 6.0 * update_multiplier(get_projection(projection), *w.shape, min(3, *w.shape))}
              for w in matrices]
    plain_opt = LoRAAdam(groups + [{"params": others, "rank": None}], **common)
    assert [plain_opt.factor_scale(w) for w in matrices] == pytest.approx(scales, rel=1e-15)
    # Matrices are seeded by their position in the optimizer: keep it (one matrix per group, same order).
    plain = _train(model, plain_opt, x, y)
    for a, b in zip(matched, plain):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    if projection == "lora":
        assert scales == [2.0, 2.0, 2.0]


def test_lora_is_unchanged_bit_for_bit():
    runs = []
    for update_scale in ("plain", "matched"):
        model, x, y = _model()
        runs.append(_train(model, LoRAAdam(model.parameters(), rank=3, lr=0.01, update_scale=update_scale), x, y))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bad_value_raises():
    model, _, _ = _model()
    with pytest.raises(ValueError, match="update_scale"):
        LoRAAdam(model.parameters(), update_scale="mup")


def test_a_checkpoint_without_the_option_loads_as_plain(tmp_path):
    model, x, y = _model()
    opt = LoRAAdam(model.parameters(), rank=3, lr=0.01, projection="additive")
    _train(model, opt, x, y, 2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:  # as written by a version without the option
        del group["update_scale"]
    torch.save(saved, tmp_path / "opt.pt")
    new = LoRAAdam(model.parameters(), rank=3, lr=0.01, projection="additive")
    new.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert new.param_groups[0]["update_scale"] == "plain"
    assert new.factor_scale(model[0].weight) == 1.0
