import pytest
import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel


@pytest.fixture
def config() -> HavocConfig:
    return HavocConfig.havoc_tiny()


@pytest.fixture
def model(config) -> HavocModel:
    torch.manual_seed(0)
    return HavocModel(config).eval()


@pytest.fixture
def ids(config) -> torch.Tensor:
    # Ids from 3 up: no pad/bos/eos, so nothing is ignored or stops early unless a test wants it.
    return torch.randint(3, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
