"""Checkpoints: exact resume in a new process, dtypes and ints preserved, mismatches refused.

* Every projection × every write mode (bf16 model) and the fp32 default, with a cosine LR
  schedule, drift probes and a skipped NaN step: save at step 4, rebuild model, optimizer and
  scheduler in a fresh Python process, load with ``weights_only=True``, finish: weights and
  optimizer state are bit-identical to the uninterrupted run.
* fp32 factors, moments and probes of a bf16 weight come back fp32; int seeds and counters exact.
* A state dict made with another rank, projection, precision or shape raises a ``ValueError``
  naming the parameter and the mismatch, and the optimizer is exactly as before.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_optim import LoRAAdam, available_projections, available_writers
from resume_worker import CHECKPOINT_AT, CONFIGS, TOTAL_STEPS, batches, build, snapshot, train


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs only cost time


def _assert_identical(expected: dict, got: dict, name: str) -> None:
    for index, (a, b) in enumerate(zip(expected["params"], got["params"])):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: parameter {index} differs"
    expected_state, got_state = expected["opt"]["state"], got["opt"]["state"]
    assert expected_state.keys() == got_state.keys()
    for pid, state in expected_state.items():
        assert state.keys() == got_state[pid].keys(), name
        for key, value in state.items():
            other = got_state[pid][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), f"{name}: state {pid}/{key}"
            else:
                assert type(value) is type(other) and value == other, f"{name}: state {pid}/{key}"
    for group, other in zip(expected["opt"]["param_groups"], got["opt"]["param_groups"]):
        assert group == other, name


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    uninterrupted = {}
    for name in CONFIGS:
        model, opt, scheduler = build(name)
        data = batches(name)
        train(model, opt, scheduler, data, 0, CHECKPOINT_AT)
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "scheduler": scheduler.state_dict()},
            tmp_path / f"{name}.pt",
        )
        train(model, opt, scheduler, data, CHECKPOINT_AT, TOTAL_STEPS)
        uninterrupted[name] = snapshot(model, opt)
        assert opt.nonfinite_skips() == 1  # the NaN step was skipped, before the checkpoint
    out_file = tmp_path / "resumed.pt"
    worker = Path(__file__).with_name("resume_worker.py")
    subprocess.run(
        [sys.executable, str(worker), str(tmp_path), str(out_file), str(torch.get_num_threads())],
        check=True, timeout=600,
    )
    resumed = torch.load(out_file, weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    for name, expected in uninterrupted.items():
        _assert_identical(expected, resumed[name], name)


def _round_trip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("precision", available_writers())
@pytest.mark.parametrize("projection", available_projections())
def test_loaded_state_keeps_dtypes_and_exact_ints(projection, precision):
    weight = nn.Parameter(torch.randn(16, 12).to(torch.bfloat16))
    big_seed = 2**62 + 12345  # beyond float precision: must stay an exact int
    options = {"resample_every": 2} if projection == "random" else {}
    opt = LoRAAdam([weight], rank=4, projection=projection, precision=precision, seed=big_seed,
                   drift_probes=2, **options)
    for _ in range(3):
        weight.grad = torch.randn(16, 12).to(torch.bfloat16)
        opt.step()
    fresh = LoRAAdam([weight], rank=4, projection=projection, precision=precision, seed=big_seed,
                     drift_probes=2, **options)
    fresh.load_state_dict(_round_trip(opt.state_dict()))
    saved, loaded = opt.state[weight], fresh.state[weight]
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
            assert loaded[key].data_ptr() != value.data_ptr()
        else:
            assert type(loaded[key]) is int and loaded[key] == value, key
    for key in ("exp_avg_A", "exp_avg_sq_B"):
        assert loaded[key].dtype == torch.float32
    assert loaded["drift_change"].dtype == torch.float64
    assert fresh.param_groups[0]["seed"] == big_seed and type(fresh.param_groups[0]["seed"]) is int


def _optimizer_snapshot(opt: LoRAAdam) -> dict:
    return {
        "groups": copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        "state": {id(p): copy.deepcopy(dict(s)) for p, s in opt.state.items()},
    }


def _assert_unchanged(before: dict, after: dict) -> None:
    assert before["groups"] == after["groups"]
    assert before["state"].keys() == after["state"].keys()
    for pid, state in before["state"].items():
        other = after["state"][pid]
        assert state.keys() == other.keys()
        for key, value in state.items():
            assert torch.equal(value, other[key]) if isinstance(value, torch.Tensor) else value == other[key]


def _trained(shapes=((6, 5), (4, 6)), **options) -> tuple[LoRAAdam, list[nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(*shape, generator=gen)) for shape in shapes]
    bias = nn.Parameter(torch.zeros(4))
    opt = LoRAAdam([{"params": params}, {"params": [bias], "rank": None}], **{"rank": 2, **options})
    for p in [*params, bias]:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return opt, [*params, bias]


MISMATCHES = [
    # (options of the optimizer that loads, shapes of its parameters, expected message)
    (dict(rank=3), None, r"parameter 0 \(group 0, shape \(6, 5\)\): rank was 2 in the checkpoint, the optimizer has 3"),
    (dict(projection="additive"), None, r"parameter 0 \(group 0, shape \(6, 5\)\): projection was 'lora'.*'additive'"),
    (dict(precision="compensated"), None, r"parameter 0 .*precision was 'nearest'.*'compensated'"),
    (dict(drift_probes=2), None, r"parameter 0 .*drift_probes was 0.*2"),
    (dict(), ((6, 5), (4, 7)), r"parameter 1 \(group 0, shape \(4, 7\)\): 'exp_avg_B' has shape \(2, 6\).*expected \(2, 7\)"),
    (dict(), ((6, 5), (1, 6)), r"parameter 1 \(group 0, shape \(1, 6\)\): the checkpoint has factors of rank 2.*rank 1"),
    (dict(), ((6, 5),), r"group 0 has 2 parameter\(s\) in the state dict and 1 in the optimizer"),
]


@pytest.mark.parametrize("options,shapes,message", MISMATCHES)
def test_mismatched_state_dict_is_refused_and_changes_nothing(options, shapes, message):
    source, _ = _trained()
    state_dict = _round_trip(source.state_dict())
    target, _ = _trained(**({"shapes": shapes} if shapes else {}), **options)
    before = _optimizer_snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state_dict)
    _assert_unchanged(before, _optimizer_snapshot(target))


def test_dense_and_low_rank_state_are_not_confused():
    """Same options, but a vector (plain AdamW) became a matrix (factors) at the same position."""
    weight, vector = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(4))
    source = LoRAAdam([weight, vector], rank=2)
    weight.grad, vector.grad = torch.ones(6, 5), torch.ones(4)
    source.step()
    target = LoRAAdam([nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(4, 1))], rank=2)
    with pytest.raises(ValueError, match=r"parameter 1 \(group 0, shape \(4, 1\)\): the checkpoint holds plain "
                                         r"AdamW moments, the optimizer trains it with low-rank factors"):
        target.load_state_dict(_round_trip(source.state_dict()))
    assert not target.state


def _bf16_run(precision, steps, state_dict=None, seed=0):
    """A bf16 weight trained ``steps`` steps with ``precision`` (after loading ``state_dict`` into a
    fresh optimizer, if given); returns ``(optimizer, weight)``."""
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter((torch.randn(12, 10, generator=gen) * 0.02).bfloat16())
    grads = [torch.randn(12, 10, generator=gen).bfloat16() for _ in range(6)]
    opt = LoRAAdam([weight], rank=2, lr=1e-4, precision=precision)
    done = 0
    if state_dict is not None:
        weight.data.copy_(state_dict["weight"])
        opt.load_state_dict(state_dict["opt"])
        done = state_dict["steps"]
    for grad in grads[done:done + steps]:
        weight.grad = grad
        opt.step()
    return opt, weight


def test_a_checkpoint_of_the_old_bf16_default_names_its_mode_and_resumes_with_it():
    """Before 0.2, ``precision=None`` meant ``compensated`` for bf16 weights; it now means
    ``stochastic``. Such a checkpoint (a Kahan buffer under ``precision=None``) is refused by the
    new default, with the fix in the message and nothing changed, and resumes exactly with
    ``precision="compensated"``, which the optimizer then keeps (not the checkpoint's None)."""
    old, weight = _bf16_run("compensated", 3)
    saved = _round_trip(old.state_dict())
    for group in saved["param_groups"]:
        group["precision"] = None  # as the old default wrote it
    checkpoint = {"opt": saved, "weight": weight.detach().clone(), "steps": 3}
    fresh, _ = _bf16_run(None, 0)
    before = _optimizer_snapshot(fresh)
    with pytest.raises(ValueError, match=r"precision was 'compensated' in the checkpoint, the optimizer has "
                                         r"'stochastic'; pass precision='compensated' to resume it"):
        fresh.load_state_dict(checkpoint["opt"])
    _assert_unchanged(before, _optimizer_snapshot(fresh))
    resumed, resumed_weight = _bf16_run("compensated", 3, checkpoint)
    assert resumed.param_groups[0]["precision"] == "compensated"
    uninterrupted, expected_weight = _bf16_run("compensated", 6)
    assert torch.equal(resumed_weight, expected_weight)
    assert torch.equal(resumed.state[resumed_weight]["weight_compensation"],
                       uninterrupted.state[expected_weight]["weight_compensation"])
