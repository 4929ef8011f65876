import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same seed, in double-free default dtype, on one thread."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
