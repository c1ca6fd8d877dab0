import pytest
import torch


def pytest_configure(config):
    # Tiny CPU matmuls run up to 10x slower with two intra-op threads when another
    # process shares the cores; one thread keeps the suite's time predictable.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
