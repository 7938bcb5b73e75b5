import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Derandomised by default (and in CI): the same examples on every run. HYPOTHESIS_PROFILE=dev
# explores new ones.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def device_params():
    """cpu, and cuda (skipped without a GPU), as pytest params."""
    return [pytest.param("cpu"), pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
