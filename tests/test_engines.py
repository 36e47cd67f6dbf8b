import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import CacheDataset, DataLoader, Dataset

from multiad_monai.data import mvtec_datalist, split_train_validation, synthetic_validation_datalist
from multiad_monai.engines import AnomalyEvaluator, MultiADTrainer
from multiad_monai.handlers import NormalThresholdHandler
from multiad_monai.inferers import image_score
from multiad_monai.metrics import AnomalyDetectionMetrics, NormalFitScore, ValidationScore
from multiad_monai.networks import (
    EfficientNetLiteEncoder,
    FeatureDiscriminator,
    MultiAD,
    MultiLevelDiscriminator,
    input_mean,
    input_std,
)
from multiad_monai.transforms import TeacherFeaturesd, image_transforms_2d, validation_transforms_2d
from monai.transforms import Compose

MEAN, STD = input_mean("efficientnet-lite0"), input_std("efficientnet-lite0")


def _network(seed=0, make_discriminator=None):
    torch.manual_seed(seed)
    teacher = EfficientNetLiteEncoder(image_size=64)
    student = EfficientNetLiteEncoder(pretrained=False, se_ratio=0.25, image_size=64)
    if make_discriminator is None:
        discriminator = FeatureDiscriminator(in_channels=320, channels=(32, 64), strides=(1, 2))
    else:
        discriminator = make_discriminator()
    return MultiAD(teacher, student, discriminator)


def _trainer(network, loader, epochs, adversarial_weight=0.01, adversarial_warmup_epochs=0):
    return MultiADTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.student.parameters(), lr=2e-3),
        discriminator_optimizer=torch.optim.Adam(network.discriminator.parameters(), lr=2e-4),
        adversarial_weight=adversarial_weight,
        adversarial_warmup_epochs=adversarial_warmup_epochs,
    )


def test_training_lowers_the_distillation_loss_with_cached_teacher(tiny_demo_dataset):
    network = _network()
    items = mvtec_datalist(tiny_demo_dataset, "train")
    transform = Compose([image_transforms_2d(64, MEAN, STD), TeacherFeaturesd("image", network.teacher)])
    loader = DataLoader(CacheDataset(items, transform, progress=False), batch_size=4, shuffle=True, drop_last=True)
    assert len(loader.dataset[0]["teacher_features"]) == 4
    trainer = _trainer(network, loader, epochs=6)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["distillation_loss"]))
    teacher_before = {k: v.clone() for k, v in network.teacher.state_dict().items()}
    trainer.run()
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])
    for key, value in network.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"teacher changed: {key}"
    assert np.isfinite(trainer.state.output["discriminator_loss"])


_DISCRIMINATORS = {
    "paper": None,
    "all levels, spectral norm": lambda: MultiLevelDiscriminator(
        in_channels=(24, 40, 112, 320), channels=(16, 32), spectral_norm=True
    ),
}


@pytest.mark.parametrize("discriminator", list(_DISCRIMINATORS))
def test_adversarial_gradient_reaches_the_student(tiny_demo_dataset, discriminator):
    items = mvtec_datalist(tiny_demo_dataset, "train")[:4]
    students = []
    # weight 1e-12 takes the same random draws as 0.01 (the discriminator runs in both): any difference
    # between the two steps is the adversarial term's gradient in the student
    for weight in (0.01, 0.01, 1e-12):
        network = _network(seed=1, make_discriminator=_DISCRIMINATORS[discriminator])
        loader = DataLoader(Dataset(items, image_transforms_2d(64, MEAN, STD)), batch_size=4)
        torch.manual_seed(5)
        _trainer(network, loader, epochs=1, adversarial_weight=weight).run()
        students.append(torch.cat([p.detach().reshape(-1) for p in network.student.parameters()]))
    assert torch.equal(students[0], students[1]), "the step is not deterministic, the comparison below means nothing"
    assert (students[0] - students[2]).abs().max() > 1e-6, "the adversarial term does not change the student"


def test_adversarial_warmup_ramps_the_weight(tiny_demo_dataset):
    items = mvtec_datalist(tiny_demo_dataset, "train")[:4]
    loader = DataLoader(Dataset(items, image_transforms_2d(64, MEAN, STD)), batch_size=2)  # 2 iterations per epoch
    trainer = _trainer(_network(), loader, epochs=3, adversarial_weight=0.01, adversarial_warmup_epochs=2)
    weights = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        weights.append(engine.current_adversarial_weight())

    trainer.run()
    assert weights == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    with pytest.raises(ValueError, match="adversarial_warmup_epochs"):
        _trainer(_network(), loader, epochs=1, adversarial_warmup_epochs=-1)


def test_cached_and_live_teacher_features_give_the_same_step(tiny_demo_dataset):
    items = mvtec_datalist(tiny_demo_dataset, "train")[:4]
    losses = []
    for cached in (True, False):
        network = _network(seed=1)
        transform = image_transforms_2d(64, MEAN, STD)
        if cached:
            transform = Compose([transform, TeacherFeaturesd("image", network.teacher, dtype=torch.float32)])
        loader = DataLoader(Dataset(items, transform), batch_size=4)
        trainer = _trainer(network, loader, epochs=1)
        trainer.run()
        losses.append(trainer.state.output["distillation_loss"])
    assert abs(losses[0] - losses[1]) < 1e-4


def test_evaluator_outputs_metrics_and_threshold(tiny_demo_dataset):
    network = _network()
    train, held_out = split_train_validation(mvtec_datalist(tiny_demo_dataset, "train"), 0.25)
    validation = synthetic_validation_datalist(held_out)
    loader = DataLoader(Dataset(validation, validation_transforms_2d(64, MEAN, STD)), batch_size=4)
    outputs = []
    evaluator = AnomalyEvaluator(
        device="cpu",
        val_data_loader=loader,
        network=network,
        key_val_metric={"val_score": ValidationScore()},
        additional_metrics={"all": AnomalyDetectionMetrics(), "fit": NormalFitScore()},
        val_handlers=[NormalThresholdHandler(network, quantile=1.0)],
    )
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    evaluator.run()
    metrics = evaluator.state.metrics
    assert 0.0 <= metrics["val_score"] <= 1.0 and metrics["fit"] < 0
    assert {"image_auroc", "pixel_auroc", "aupro"} <= set(metrics)
    labels = torch.cat([o["label"] for o in outputs])
    scores = torch.cat([o["score"] for o in outputs])
    assert labels.tolist().count(0) == len(held_out) and labels.tolist().count(1) == len(held_out)
    assert float(network.threshold) == float(scores[labels == 0].max())
    assert outputs[0]["anomaly_map"].shape[1:] == (1, 64, 64)
    assert all("+synthetic" in n or "good/" in n for o in outputs for n in o["name"])


@pytest.mark.parametrize("use_map_maximum", [False, True])
def test_threshold_from_map_maxima_for_a_top_pixels_score(use_map_maximum):
    maps = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    scores = image_score(maps, "topk")
    engine = Engine(lambda e, batch: {"label": labels, "score": scores, "anomaly_map": maps})
    network = _network()
    NormalThresholdHandler(network, quantile=1.0, use_map_maximum=use_map_maximum).attach(engine)
    engine.run([0], max_epochs=1)

    normal = maps[labels == 0].flatten(1).amax(dim=1) if use_map_maximum else scores[labels == 0]
    assert float(network.threshold) == pytest.approx(float(normal.max()))
    masks = maps[labels == 0] >= network.threshold
    # from the maxima only the normal image that sets the threshold (quantile 1) reaches it; from the top-1% means, more do
    assert (int(masks.flatten(1).any(dim=1).sum()) == 1) == use_map_maximum


def test_training_chain_is_fully_cached_with_teacher_features(tiny_demo_dataset):
    from multiad_monai.transforms import training_transforms_2d

    network = _network()
    calls = []
    network.teacher.register_forward_hook(lambda *args: calls.append(1))
    items = mvtec_datalist(tiny_demo_dataset, "train")[:3]
    dataset = CacheDataset(items, training_transforms_2d(64, MEAN, STD, teacher=network.teacher), progress=False)
    assert len(calls) == 3
    for _ in range(2):
        sample = dataset[0]
    assert len(calls) == 3, "the teacher ran again: the chain is not cached"
    assert type(sample["image"]) is torch.Tensor and sample["teacher_features"][0].dtype == torch.float16


def test_normal_fit_score_uses_only_normal_samples():
    from multiad_monai.metrics import NormalFitScore

    metric = NormalFitScore()
    metric.reset()
    maps = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.3, 5.0)])
    metric.update({"anomaly_map": maps, "label": torch.tensor([0, 0, 1])})
    assert metric.compute() == pytest.approx(-0.2)
