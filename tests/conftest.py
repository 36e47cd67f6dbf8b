import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
BUNDLE_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "bundles", "multiad_2d"))


def shared_data(*parts: str) -> str:
    """Path under ../shared/data; skips the test when it is absent (a user's machine has no such folder)."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_demo_dataset(tmp_path_factory):
    from multiad_monai.data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    return make_demo_dataset(str(root), num_train=20, num_test_good=4, num_test_defect=6, image_size=64, seed=3)


class MedianDeviationNet(torch.nn.Module):
    """Fake 2D anomaly network: the map is the channel mean of |image - its median|, so bright lesions stand
    out; carries the ``threshold``/``score_scale`` buffers of a trained MultiAD."""

    def __init__(self, threshold: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(threshold))
        self.register_buffer("score_scale", torch.tensor(0.5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        median = images.flatten(1).median(dim=1).values.reshape(-1, 1, 1, 1)
        return (images - median).abs().mean(dim=1, keepdim=True)
