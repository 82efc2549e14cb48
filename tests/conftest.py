"""Suite-wide settings."""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use tiny networks, where thread hand-offs cost more than they save; one thread also
    keeps the in-process tests from fighting the pipeline subprocesses for the two CI cores."""
    torch.set_num_threads(1)
    yield
