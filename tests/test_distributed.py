"""DDP and FSDP2 on 2 processes (gloo, CPU), against one process that sees the whole batch.

Each test starts 2 ranks with ``torch.multiprocessing.spawn`` (``tests/distributed_worker.py``);
rank ``k`` trains on rows ``k::2`` of every batch. The single-process reference trains the same
float64 model on the whole batch; the data-parallel average of the ranks' gradients is the
gradient of the whole batch's mean loss, so the trajectories agree to float rounding (≤ 1e-10).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lora_optim.state_keys import STEP_SIZE_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.distributed

TOL = 1e-10
WORLD = 2


def _spawn(tmp_path: Path, scenario: str, extra: str = "") -> list:
    rendezvous = tmp_path / f"{scenario}.rendezvous"
    mp.spawn(worker.main, args=(WORLD, str(rendezvous), str(tmp_path), scenario, extra), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{scenario}-rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _reference(options: dict, first: int = 0, steps: int = worker.STEPS, model=None, optimizer=None):
    model = model if model is not None else worker.make_model()
    optimizer = optimizer if optimizer is not None else worker.make_optimizer(model, options)
    trajectory = worker.train(model, optimizer, worker.batches(), rank=0, world=1, first=first, steps=steps)
    return model, optimizer, trajectory


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _assert_trajectory(got, expected, label):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert _rel(a, b) <= TOL, f"{label}, step {step + 1}: relative difference {_rel(a, b):.2e}"


def _assert_same_states(states, label, per_rank_keys=()):
    """Every rank's state equal, but for ``per_rank_keys`` (present on every rank, values its own)."""
    first = states[0]
    for other in states[1:]:
        assert first.keys() == other.keys()
        for name in first:
            assert first[name].keys() == other[name].keys(), (label, name)
            for key, value in first[name].items():
                if key.endswith(":local_numel") or key in per_rank_keys:
                    continue
                theirs = other[name][key]
                assert torch.equal(value, theirs) if isinstance(value, torch.Tensor) else value == theirs, (label, name, key)


@pytest.fixture(scope="module")
def ddp_plain(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("ddp-plain"), "ddp-plain")


@pytest.fixture(scope="module")
def ddp_activation(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("ddp-activation"), "ddp-activation")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("fsdp"), "fsdp")


@pytest.mark.parametrize("case", list(worker.CASES))
def test_ddp_equals_one_process_and_ranks_agree(ddp_plain, case):
    _, _, expected = _reference(worker.CASES[case])
    for rank, result in enumerate(ddp_plain):
        _assert_trajectory(result[case]["trajectory"], expected, f"{case} rank {rank}")
    _assert_same_states([result[case]["state"] for result in ddp_plain], case)


@pytest.mark.parametrize("case", list(worker.CASES))
def test_ddp_activation_side_equals_one_process(ddp_activation, case):
    """Attached before wrapping: DDP skips the weights, the optimizer averages the factor gradients."""
    _, _, expected = _reference(worker.CASES[case])
    for rank, result in enumerate(ddp_activation):
        _assert_trajectory(result[case]["trajectory"], expected, f"{case} rank {rank}")
    _assert_same_states([result[case]["state"] for result in ddp_activation], case)


def test_per_layer_mode_is_refused_in_a_process_group(tmp_path):
    results = _spawn(tmp_path, "ddp-per_layer")
    for result in results:
        assert result["error"] is not None and "per-layer mode does not run in a process group" in result["error"]


@pytest.mark.parametrize("case", list(worker.CASES))
def test_fsdp2_equals_one_process(fsdp, case):
    _, optimizer, expected = _reference(worker.CASES[case])
    for rank, result in enumerate(fsdp):
        _assert_trajectory(result[case]["trajectory"], expected, f"{case} rank {rank}")
    _assert_same_states([result[case]["state"] for result in fsdp], case, per_rank_keys=STEP_SIZE_KEYS)
    # The whole state, gathered from the shards, is the one-process state.
    model = worker.make_model()
    reference = worker.make_optimizer(model, worker.CASES[case])
    worker.train(model, reference, worker.batches(), rank=0, world=1)
    ours = fsdp[0][case]["state"]
    for name, p in model.named_parameters():
        for key, value in reference.state[p].items():
            if key in STEP_SIZE_KEYS:  # the divergence guard measures each rank's rows on a shard
                continue
            got = ours[name][key]
            if isinstance(value, torch.Tensor) and not value.is_floating_point():  # the packed sparsity mask
                assert torch.equal(got, value), (name, key)
            elif key == "weight_compensation":  # rounding residues (~1e-17): compare to the weights' size
                assert (got - value).abs().max() <= TOL * p.detach().abs().max(), (name, key)
            elif isinstance(value, torch.Tensor):
                assert got.shape == value.shape and _rel(got, value) <= TOL or (value.norm() == 0 and got.norm() == 0), (
                    name, key)
            else:
                assert got == value, (name, key)


@pytest.fixture(scope="module")
def fsdp_activation(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("fsdp-activation"), "fsdp-activation")


@pytest.mark.parametrize("case", list(worker.CASES))
def test_fsdp2_activation_side_equals_one_process(fsdp_activation, case):
    """Attached after fully_shard: whole factor gradients from each rank's batch, averaged, this
    rank's rows of g_A kept; no gradient of W is formed."""
    _, _, expected = _reference(worker.CASES[case])
    for rank, result in enumerate(fsdp_activation):
        _assert_trajectory(result[case]["trajectory"], expected, f"{case} rank {rank}")
    _assert_same_states([result[case]["state"] for result in fsdp_activation], case, per_rank_keys=STEP_SIZE_KEYS)


@pytest.mark.parametrize("case", ["lora", "random-K3-reset", "additive", "lora-compensated"])
def test_fsdp2_shards_the_row_state_and_replicates_the_rest(fsdp, case):
    """Per rank, A, its moments and the compensation buffer hold this rank's rows (about half);
    B and its moments are whole on every rank."""
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        states = [result[case]["state"][name] for result in fsdp]
        rows = states[0]["exp_avg_A"].shape[0]
        for key in ("exp_avg_A", "exp_avg_sq_A", "A", "weight_compensation"):
            if key not in states[0]:
                continue
            whole = states[0][key].numel()
            local = [state[key + ":local_numel"] for state in states]
            assert sum(local) == whole, (name, key, local)
            chunk = -(-rows // len(states))  # ceil: torch.chunk's split
            assert local[0] == whole // rows * chunk, (name, key, local)
        for key in ("exp_avg_B", "exp_avg_sq_B", "B"):
            if key in states[0]:
                assert all(state[key + ":local_numel"] == states[0][key].numel() for state in states), (name, key)


def test_fsdp2_keeps_zeros_with_preserve_sparsity(fsdp):
    """The packed mask is sharded like W: every zero stays exactly zero on every rank."""
    model = worker.make_model()
    zeros = torch.cat([(p.detach() == 0).reshape(-1) for p in model.parameters()])
    for result in fsdp:
        final = result["lora-sparse"]["trajectory"][-1]
        assert (final[zeros] == 0).all()
        assert (result["lora"]["trajectory"][-1][zeros] != 0).any()  # without the option, zeros move


def test_fsdp2_refuses_what_has_no_sharded_form(fsdp):
    """Each refused before anything changes, with a message naming what is not available."""
    for result in fsdp:
        assert result["refused"] is not None and "drift" in result["refused"]
        refusals = result["refusals"]
        assert set(refusals) == {"max_grad_norm", "set_factors", "merge_factors"}
        for what, (message, unchanged) in refusals.items():
            assert what in message and "sharded" in message and unchanged, what


DCP_CASES = worker.DCP_CASES


def _dcp_load_into(model, optimizer, checkpoint: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


@pytest.fixture(scope="module")
def dcp_two_to_one(tmp_path_factory):
    """2 ranks train 2 steps, save through DCP, train 2 more."""
    path = tmp_path_factory.mktemp("dcp-2-to-1")
    return path / "checkpoint", _spawn(path, "dcp-save", str(path / "checkpoint"))


@pytest.fixture(scope="module")
def dcp_one_to_two(tmp_path_factory):
    """One process trains 2 steps and saves through DCP; 2 ranks load it and train 2 more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = tmp_path_factory.mktemp("dcp-1-to-2")
    for case in DCP_CASES:
        model, optimizer, _ = _reference(worker.CASES[case], steps=2)
        with pytest.warns(UserWarning, match="single process"):
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=str(path / "checkpoint" / case))
    return _spawn(path, "dcp-load", str(path / "checkpoint"))


@pytest.mark.parametrize("name", DCP_CASES)
def test_dcp_checkpoint_from_two_ranks_resumes_in_one_process(dcp_two_to_one, name):
    checkpoint, saved = dcp_two_to_one
    _, _, expected = _reference(worker.CASES[name], steps=4)
    for rank, result in enumerate(saved):
        _assert_trajectory(result[name], expected[2:], f"{name} rank {rank}, uninterrupted")
    model = worker.make_model()
    optimizer = worker.make_optimizer(model, worker.CASES[name])
    with pytest.warns(UserWarning, match="single process"):
        _dcp_load_into(model, optimizer, checkpoint / name)
    _, _, resumed = _reference(worker.CASES[name], first=2, steps=2, model=model, optimizer=optimizer)
    _assert_trajectory(resumed, expected[2:], f"{name} resumed on 1 process")


@pytest.mark.parametrize("name", DCP_CASES)
def test_dcp_checkpoint_from_one_process_resumes_on_two_ranks(dcp_one_to_two, name):
    _, _, expected = _reference(worker.CASES[name], steps=4)
    for rank, result in enumerate(dcp_one_to_two):
        _assert_trajectory(result[name], expected[2:], f"{name} resumed on 2 ranks, rank {rank}")
