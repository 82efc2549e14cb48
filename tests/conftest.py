"""Suite-wide settings and the test tiers.

Tiers (markers): `unit` (in-process, no pipeline job; the bulk, and the default for an unmarked test),
`integration` (a real pipeline job or a subprocess, tiny settings), `slow` (long runs, not in `make
test`), `realdata` (reads ../shared/realdata; skipped with the reason where it is absent).
"""
import pytest
import torch

from pipeline import shell

shell.start()  # what every entry does first (schema, resolvers, torchvision, NO_ALBUMENTATIONS_UPDATE)

TIERS = ("unit", "integration", "slow")


def pytest_collection_modifyitems(items):
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use tiny networks, where thread hand-offs cost more than they save; one thread also
    keeps the in-process tests from fighting the pipeline subprocesses for the two CI cores."""
    torch.set_num_threads(1)
    yield
