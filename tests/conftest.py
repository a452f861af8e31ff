import pytest
import torch

import diffsteps as ds

# the tests use small tensors: intra-op threads only add contention (40× slower on a loaded 2-core machine)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def linear():
    return ds.make_schedule("linear", 1000)


@pytest.fixture(scope="session")
def mixture():
    """Three unequal, well-separated 2-D modes with distinct full covariances."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
    covs = torch.tensor([[[0.30, 0.10], [0.10, 0.20]], [[0.15, -0.05], [-0.05, 0.25]], [[0.20, 0.0], [0.0, 0.10]]])
    return ds.GaussianMixture(means, covs, weights=[0.5, 0.3, 0.2])


@pytest.fixture(scope="module")
def gaussian():
    """N(μ, Σ) in 3-D with a full covariance: the simplest data with an exact score."""
    mu = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    a = torch.tensor([[0.6, 0.2, 0.0], [0.0, 0.4, -0.3], [0.1, 0.0, 0.3]], dtype=torch.float64)
    return ds.GaussianMixture(mu[None], (a @ a.T + 0.05 * torch.eye(3, dtype=torch.float64))[None])



@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under ``-n`` (pytest-xdist, ``--dist loadgroup``): a file's tests run on one worker, so a module fixture (a
    trained run several tests read) is made once; files sharing a session-made run (``tests/seed_sweep.py``) set
    one ``xdist_group`` for all of them. Without xdist the marks do nothing."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
