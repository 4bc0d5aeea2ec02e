"""``transformers.Trainer(..., optimizers=(LoRAAdam(...), scheduler))``: checkpoint and resume.

The runs are those of :mod:`tests.trainer_worker` (the packaged MiniLM with a
sequence-classification head, gradient accumulation 2, a warmup schedule, ``LoRAAdam``'s own
``max_grad_norm``). Trainer saves ``optimizer.pt`` with ``torch.save(optimizer.state_dict())`` and
loads it with ``torch.load(..., weights_only=True)``; a run interrupted at its checkpoint and
resumed in a new process must end bit for bit where the uninterrupted run ends.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_worker import CHECKPOINT_AT, TOTAL_STEPS

WORKER = Path(__file__).with_name("trainer_worker.py")


def _launch(*arguments: str) -> None:
    subprocess.run([sys.executable, str(WORKER), *arguments], check=True, timeout=900)


def _assert_identical(expected: dict, got: dict) -> None:
    assert expected["model"].keys() == got["model"].keys()
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, got["model"][name]), f"model tensor {name} differs"
    ours, theirs = expected["optimizer"], got["optimizer"]
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for pid, state in ours["state"].items():
        assert state.keys() == theirs["state"][pid].keys()
        for key, value in state.items():
            other = theirs["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (pid, key)


@pytest.mark.slow
def test_trainer_resumes_in_a_new_process_bit_for_bit(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _launch(str(full), "full")
    _launch(str(part), "interrupted")
    checkpoint = part / f"checkpoint-{CHECKPOINT_AT}"
    assert not (part / f"checkpoint-{TOTAL_STEPS}").exists(), "the interrupted run went on"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what Trainer does on resume
    assert all(float(state["step"]) == CHECKPOINT_AT for state in saved["state"].values())
    _launch(str(part), "resume", str(checkpoint))
    expected = torch.load(full / "final.pt", weights_only=True)
    resumed = torch.load(part / "final.pt", weights_only=True)
    assert all(float(state["step"]) == TOTAL_STEPS for state in expected["optimizer"]["state"].values())
    _assert_identical(expected, resumed)
    # It trained: the encoder's Linear weights moved from the checkpoint's.
    from safetensors.torch import load_file

    at_checkpoint = load_file(str(checkpoint / "model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(at_checkpoint[name], expected["model"][name])
    # The optimizer state is what makes it exact (so the comparison above can fail): without
    # optimizer.pt the factors restart from their init and the run ends elsewhere.
    blind = tmp_path / "blind"
    shutil.copytree(checkpoint, blind / checkpoint.name)
    (blind / checkpoint.name / "optimizer.pt").unlink()
    _launch(str(blind), "resume", str(blind / checkpoint.name))
    restarted = torch.load(blind / "final.pt", weights_only=True)
    assert not torch.equal(restarted["model"][name], expected["model"][name])
