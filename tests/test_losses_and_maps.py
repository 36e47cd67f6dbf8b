import math

import pytest
import torch
import torch.nn.functional as F

from multiad_monai.handlers import fit_normal_statistics
from multiad_monai.inferers import AnomalyMapGenerator, cosine_distance_maps, image_score
from multiad_monai.losses import CosineDistillationLoss, DiscriminatorLoss, StudentAdversarialLoss


def test_cosine_distillation_hand_cases():
    t = [torch.tensor([[[[1.0]], [[0.0]]]]), torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])]
    same = [x.clone() * 3 for x in t]  # scale does not matter
    assert float(CosineDistillationLoss()(t, same)) == pytest.approx(0.0, abs=1e-6)
    opposite = [-x for x in t]
    assert float(CosineDistillationLoss()(t, opposite)) == pytest.approx(4.0)  # 2 per level
    orthogonal = [torch.tensor([[[[0.0]], [[1.0]]]]), torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])]
    # level 1: 1 - 0 = 1; level 2: mean(1 - 0, 1 - cos45) = (1 + 1 - 1/sqrt2) / 2
    expected = 1.0 + (2.0 - 1.0 / math.sqrt(2.0)) / 2.0
    assert float(CosineDistillationLoss()(t, orthogonal)) == pytest.approx(expected, rel=1e-5)
    assert float(CosineDistillationLoss([0.0, 1.0])(t, orthogonal)) == pytest.approx(expected - 1.0, rel=1e-5)
    with pytest.raises(ValueError):
        CosineDistillationLoss()(t, t[:1])


def test_adversarial_losses_follow_the_discriminator():
    confident = torch.full((4, 1), 10.0)
    assert float(DiscriminatorLoss()(confident, -confident)) < 1e-3
    assert float(DiscriminatorLoss()(-confident, confident)) > 5
    assert float(StudentAdversarialLoss()(confident)) < 1e-3
    assert float(StudentAdversarialLoss()(torch.zeros(2, 1))) == pytest.approx(math.log(2), rel=1e-5)


def test_cosine_distance_maps_locate_a_changed_patch():
    teacher = [torch.ones(1, 4, 8, 8), torch.ones(1, 8, 4, 4)]
    student = [t.clone() for t in teacher]
    student[0][:, :, 2, 3] = -1.0
    maps = cosine_distance_maps(teacher, student, (32, 32))
    assert maps.shape == (1, 2, 32, 32)
    assert float(maps[0, 1].abs().max()) < 1e-6
    peak = divmod(int(maps[0, 0].argmax()), 32)
    assert 8 <= peak[0] < 12 and 12 <= peak[1] < 16


@pytest.mark.parametrize("fusion", ["mean", "product", "learned"])
def test_generator_modes(fusion):
    generator = AnomalyMapGenerator(num_levels=2, fusion=fusion, sigma=2.0).eval()
    teacher = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    student = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    amap = generator(teacher, student, (32, 32))
    assert amap.shape == (2, 1, 32, 32) and bool(torch.isfinite(amap).all()) and bool((amap >= 0).all())


def test_generator_product_and_level_selection_without_smoothing():
    level_maps = torch.rand(1, 3, 5, 5)
    assert torch.allclose(AnomalyMapGenerator(num_levels=3, fusion="product", sigma=0).fuse(level_maps), level_maps.prod(1, keepdim=True))
    generator = AnomalyMapGenerator(num_levels=3, fusion="mean", sigma=0, levels=[1, 2])
    t = [torch.randn(1, 2, 5, 5) for _ in range(3)]
    s = [torch.randn(1, 2, 5, 5) for _ in range(3)]
    expected = cosine_distance_maps(t[1:], s[1:], (5, 5)).mean(1, keepdim=True)
    assert torch.allclose(generator(t, s, (5, 5)), expected)
    with pytest.raises(ValueError):
        AnomalyMapGenerator(num_levels=2, levels=[2])
    with pytest.raises(ValueError):
        AnomalyMapGenerator(fusion="max")


def test_level_weights_give_a_weighted_mean():
    level_maps = torch.rand(2, 4, 6, 6)
    weighted = AnomalyMapGenerator(num_levels=4, sigma=0, level_weights=[2, 1, 1, 0]).fuse(level_maps)
    expected = (2 * level_maps[:, 0] + level_maps[:, 1] + level_maps[:, 2]) / 4
    assert torch.allclose(weighted[:, 0], expected, atol=1e-6)
    equal = AnomalyMapGenerator(num_levels=4, sigma=0, level_weights=[1, 1, 1, 1]).fuse(level_maps)
    assert torch.allclose(equal, AnomalyMapGenerator(num_levels=4, sigma=0).fuse(level_maps), atol=1e-6)
    for bad in ([1, 1, 1], [1, -1, 1, 1], [0, 0, 0, 0]):
        with pytest.raises(ValueError):
            AnomalyMapGenerator(num_levels=4, level_weights=bad)
    with pytest.raises(ValueError):
        AnomalyMapGenerator(num_levels=4, fusion="product", level_weights=[1, 1, 1, 1])


def test_generator_3d():
    generator = AnomalyMapGenerator(spatial_dims=3, num_levels=1, sigma=1.0)
    amap = generator([torch.randn(1, 4, 4, 4, 4)], [torch.randn(1, 4, 4, 4, 4)], (16, 16, 16))
    assert amap.shape == (1, 1, 16, 16, 16)


def test_image_score():
    amap = torch.zeros(2, 1, 10, 10)
    amap[0, 0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert image_score(amap).tolist() == [5.0, 0.0]
    assert image_score(amap, "topk", topk_ratio=0.03).tolist() == pytest.approx([4.0, 0.0])
    with pytest.raises(ValueError):
        image_score(amap, "median")


def test_pixel_level_normalization_is_a_z_score_against_normal_statistics():
    generator = AnomalyMapGenerator(num_levels=2, fusion="mean", sigma=0, level_normalization="pixel")
    t = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    s = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    raw = generator.raw_level_maps(t, s, (8, 8))
    # unfitted statistics (mean 0, std 1) leave the maps as they are
    assert torch.allclose(generator.level_maps(t, s, (8, 8)), raw)
    mean, std = torch.rand(2, 8, 8), torch.rand(2, 8, 8) + 0.5
    generator.set_normal_statistics(mean, std)
    assert torch.allclose(generator(t, s, (8, 8)), ((raw - mean) / std).mean(1, keepdim=True))
    # a map of another size gets the statistics resized to it
    assert generator.level_maps(t, s, (16, 16)).shape == (1, 2, 16, 16)
    # a pixel that never varied on normal images is bounded by min_std, not divided by zero
    generator.set_normal_statistics(mean, torch.zeros(2, 8, 8))
    assert bool(torch.isfinite(generator(t, s, (8, 8))).all())
    with pytest.raises(ValueError, match="len\\(levels\\)"):
        generator.set_normal_statistics(torch.zeros(3, 8, 8), torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="product"):
        AnomalyMapGenerator(num_levels=2, fusion="product", level_normalization="pixel")
    with pytest.raises(ValueError, match="level_normalization"):
        AnomalyMapGenerator(num_levels=2, level_normalization="image")


def test_level_normalization_is_one_z_score_per_level():
    generator = AnomalyMapGenerator(num_levels=2, fusion="mean", sigma=0, level_normalization="level", level_weights=[2, 1])
    t = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    s = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    raw = generator.raw_level_maps(t, s, (8, 8))
    assert generator.normal_mean.shape == (2, 1, 1) and torch.allclose(generator.level_maps(t, s, (8, 8)), raw)
    mean, std = torch.tensor([0.2, 0.5]).reshape(2, 1, 1), torch.tensor([0.1, 0.4]).reshape(2, 1, 1)
    generator.set_normal_statistics(mean, std)
    z = (raw - mean) / std
    assert torch.allclose(generator(t, s, (8, 8)), (2 * z[:, :1] + z[:, 1:]) / 3, atol=1e-6)
    with pytest.raises(ValueError, match="product"):
        AnomalyMapGenerator(num_levels=2, fusion="product", level_normalization="level")


def test_fit_level_statistics_pools_all_pixels_of_a_level():
    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.map_generator = AnomalyMapGenerator(num_levels=2, sigma=0, level_normalization="level")

        def features(self, images):
            return [images, images[..., ::2, ::2]], [images.flip(-1), images[..., ::2, ::2].flip(-2)]

    network = Network()
    images = torch.randn(5, 3, 8, 8)
    assert fit_normal_statistics(network, [{"image": images[:3]}, {"image": images[3:]}]) == 5
    raw = network.map_generator.raw_level_maps(*network.features(images), (8, 8))
    pooled = raw.transpose(0, 1).flatten(1)
    assert torch.allclose(network.map_generator.normal_mean.flatten(), pooled.mean(1), atol=1e-5)
    assert torch.allclose(network.map_generator.normal_std.flatten(), pooled.std(1), atol=1e-5)


def test_upsampled_features_take_the_cosine_on_the_finest_grid():
    t = [torch.randn(1, 3, 4, 4), torch.randn(1, 5, 2, 2)]
    s = [torch.randn(1, 3, 4, 4), torch.randn(1, 5, 2, 2)]
    plain = cosine_distance_maps(t, s, (8, 8))
    fine = cosine_distance_maps(t, s, (8, 8), upsample_features=True)
    # the finest level is the same; the coarse one is the cosine of features interpolated to 4x4
    assert torch.allclose(fine[:, 0], plain[:, 0])
    up = [F.interpolate(x, size=[4, 4], mode="bilinear", align_corners=False) for x in (t[1], s[1])]
    expected = F.interpolate(1 - F.cosine_similarity(*up, dim=1).unsqueeze(1), size=[8, 8], mode="bilinear", align_corners=False)
    assert torch.allclose(fine[:, 1:], expected, atol=1e-6) and not torch.allclose(fine[:, 1:], plain[:, 1:])
    generator = AnomalyMapGenerator(num_levels=2, sigma=0, upsample_features=True)
    assert torch.allclose(generator.raw_level_maps(t, s, (8, 8)), fine)


def test_fitted_normal_statistics_load_into_an_unfitted_generator():
    fitted = AnomalyMapGenerator(num_levels=2, level_normalization="pixel")
    fitted.set_normal_statistics(torch.rand(2, 8, 8), torch.rand(2, 8, 8) + 0.1)
    fresh = AnomalyMapGenerator(num_levels=2, level_normalization="pixel")
    fresh.load_state_dict(fitted.state_dict())
    assert torch.equal(fresh.normal_mean, fitted.normal_mean) and torch.equal(fresh.normal_std, fitted.normal_std)
    # raw-map generators have no such buffers, so their older checkpoints load strictly
    assert "normal_mean" not in AnomalyMapGenerator(num_levels=2).state_dict()


def test_loaded_map_smoothing_wins_and_a_different_setting_is_logged(caplog):
    import logging

    trained = AnomalyMapGenerator(num_levels=2, sigma=4.0)
    configured = AnomalyMapGenerator(num_levels=2, sigma=2.0)
    with caplog.at_level(logging.WARNING):
        configured.load_state_dict(trained.state_dict())
    assert float(configured.smooth.sigma[0]) == 4.0  # the threshold saved with it was set on these maps
    assert "sigma 4 is used, not the configured 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        AnomalyMapGenerator(num_levels=2, sigma=4.0).load_state_dict(trained.state_dict())
    assert "sigma" not in caplog.text
