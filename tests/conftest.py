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


@pytest.fixture(scope="session")
def corpus_files():
    """A slice of the embedded standard-library corpus: real text, quick to train on."""
    from havoc_core.tokenizer import stdlib_corpus

    return stdlib_corpus()[:80]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_files):
    from havoc_core.tokenizer import Corpus, HavocTokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    HavocTokenizer.train(Corpus(corpus_files), vocab_size=1000).save(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from havoc_core.tokenizer import HavocTokenizer

    return HavocTokenizer.load(tokenizer_dir)
