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


def noise(n, d, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class CountingModel(torch.nn.Module):
    """Wraps a model, counts calls and records the t it was given."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.ts = inner, 0, []

    def forward(self, x, t):
        self.calls += 1
        self.ts.append(t.clone())
        return self.inner(x, t)
