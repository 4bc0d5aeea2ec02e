"""Shared test settings: hypothesis profile with no deadline (CPU timings swing), and a fixture
for one intra-op thread."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: The checkout the tests run in. Python processes the tests start (workers run as scripts,
#: benchmark smoke runs) import its ``lora_optim`` first: a script's ``sys.path[0]`` is its own
#: folder, so an installed ``lora_optim`` of another checkout would be imported otherwise.
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tests of tiny models run many small ops,
    which thread hand-offs only slow down, a lot on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
