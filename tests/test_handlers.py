import numpy as np
import torch
from monai.data import DataLoader, Dataset

from multiad_monai.data import mvtec_datalist
from multiad_monai.handlers import fit_learned_fusion, normalized_score, render_overlay
from multiad_monai.inferers import AnomalyMapGenerator
from multiad_monai.networks import EfficientNetLiteEncoder, MultiAD, input_mean, input_std
from multiad_monai.transforms import validation_transforms_2d


def test_fit_learned_fusion_changes_the_head_and_lowers_its_loss(tiny_demo_dataset):
    torch.manual_seed(0)
    network = MultiAD(
        EfficientNetLiteEncoder(image_size=64),
        EfficientNetLiteEncoder(pretrained=False, image_size=64),
        map_generator=AnomalyMapGenerator(num_levels=4, fusion="learned", sigma=2.0),
    )
    items = mvtec_datalist(tiny_demo_dataset, "train")[:8]
    transform = validation_transforms_2d(64, input_mean("efficientnet-lite0"), input_std("efficientnet-lite0"), defect_probability=1.0)
    loader = DataLoader(Dataset(items, transform), batch_size=4)
    head = network.map_generator.fusion_head
    before = head.conv.weight.detach().clone()
    short = fit_learned_fusion(network, loader, steps=2)
    longer = fit_learned_fusion(network, loader, steps=100)
    assert longer < short
    assert not torch.allclose(before, head.conv.weight)
    assert not head.training
    with torch.no_grad():
        amap = network(torch.randn(1, 3, 64, 64))
    assert amap.shape == (1, 1, 64, 64) and bool((amap >= 0).all())


def test_render_overlay_outlines_the_thresholded_region():
    image = np.zeros((3, 20, 30), dtype=np.float32)
    amap = np.zeros((20, 30), dtype=np.float32)
    amap[5:10, 10:20] = 1.0
    picture = render_overlay(image, amap, threshold=0.5)
    assert picture.shape == (20, 60, 3) and picture.dtype == np.uint8
    right = picture[:, 30:]
    assert (right[5, 10:20] == 255).all()  # outline drawn in white on the region's edge
    assert (right[0, 0] < 255).all()
    assert render_overlay(image[:1], amap).shape == (20, 60, 3)


def test_normalized_score_is_one_half_at_the_threshold():
    assert normalized_score(0.3, 0.3, 0.1) == 0.5
    assert normalized_score(0.5, 0.3, 0.1) > 0.5 > normalized_score(0.1, 0.3, 0.1)
    assert np.isnan(normalized_score(0.3, float("nan"), 0.1))
