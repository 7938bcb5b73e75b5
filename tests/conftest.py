import os
import random
import zlib

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



@pytest.fixture(autouse=True)
def _seeded_rngs(request):
    """Each test starts from its own fixed seed (from its id): the unseeded torch.randn in a
    test draws the same values on every run and in any test order, so a failure reproduces
    instead of flaking."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def pytest_make_parametrize_id(config, val, argname):
    """Test ids name dtypes (test_x[float16-cpu], not test_x[dtype0-cpu])."""
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    return None


HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def device_params():
    """cpu, and cuda (skipped without a GPU), as pytest params."""
    return [pytest.param("cpu"), pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


def pytest_collection_modifyitems(config, items):
    """Every test that runs on a GPU carries the `cuda` mark, however it asks for one (a
    device parameter "cuda...", the requires_cuda skip), so that `-m cuda` selects them all."""
    for item in items:
        params = getattr(item, "callspec", None)
        on_cuda = params is not None and any(
            isinstance(v, (str, torch.device)) and str(v).startswith("cuda")
            for v in params.params.values())
        needs_gpu = any(m.name == "skipif" and m.kwargs.get("reason") == requires_cuda.kwargs["reason"]
                        for m in item.iter_markers())
        if (on_cuda or needs_gpu) and not item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.cuda)
