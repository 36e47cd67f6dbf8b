"""MONAI transforms for 2D anomaly detection data."""

from multiad_monai.transforms.chains import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    image_transforms_2d,
    training_transforms_2d,
    pil_to_8bit_scale,
    pil_to_gray,
    validation_transforms_2d,
)
from multiad_monai.transforms.channels import (
    EnsureRGB,
    EnsureRGBD,
    EnsureRGBd,
    EnsureRGBDict,
    TwoModalitiesToRGB,
    TwoModalitiesToRGBD,
    TwoModalitiesToRGBd,
    TwoModalitiesToRGBDict,
    source_name,
)
from multiad_monai.transforms.slice_context import (
    SliceContextChannels,
    SliceContextChannelsD,
    SliceContextChannelsd,
    SliceContextChannelsDict,
)
from multiad_monai.transforms.teacher_features import TeacherFeaturesd
from multiad_monai.transforms.masks import EmptyMaskD, EmptyMaskd, EmptyMaskDict, zeros_mask_like
from multiad_monai.transforms.synthetic import (
    SYNTHETIC_DEFECT_TYPES,
    RandSyntheticDefectD,
    RandSyntheticDefectd,
    RandSyntheticDefectDict,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_DEFECT_TYPES",
    "TeacherFeaturesd",
    "EmptyMaskD",
    "EmptyMaskDict",
    "EmptyMaskd",
    "EnsureRGB",
    "EnsureRGBD",
    "EnsureRGBDict",
    "EnsureRGBd",
    "TwoModalitiesToRGB",
    "TwoModalitiesToRGBD",
    "TwoModalitiesToRGBDict",
    "TwoModalitiesToRGBd",
    "SliceContextChannels",
    "SliceContextChannelsD",
    "SliceContextChannelsDict",
    "SliceContextChannelsd",
    "RandSyntheticDefectD",
    "RandSyntheticDefectDict",
    "RandSyntheticDefectd",
    "denormalize",
    "image_transforms_2d",
    "training_transforms_2d",
    "pil_to_8bit_scale",
    "pil_to_gray",
    "source_name",
    "validation_transforms_2d",
    "zeros_mask_like",
]

from multiad_monai.transforms.intensity import (
    CheckFinite,
    CheckFiniteD,
    CheckFiniteDict,
    CheckFinited,
    ForegroundPercentileScale,
    ForegroundPercentileScaleD,
    ForegroundPercentileScaleDict,
    ForegroundPercentileScaled,
    HounsfieldWindow,
    HounsfieldWindowD,
    HounsfieldWindowDict,
    HounsfieldWindowd,
)
from multiad_monai.transforms.slices import (
    RandNormalSliceD,
    RandNormalSliceDict,
    RandNormalSliced,
    slice_coverage,
    stack_slices,
    volume_slices,
)

__all__ += [
    "CheckFinite",
    "CheckFiniteD",
    "CheckFiniteDict",
    "CheckFinited",
    "ForegroundPercentileScale",
    "ForegroundPercentileScaleD",
    "ForegroundPercentileScaleDict",
    "ForegroundPercentileScaled",
    "HounsfieldWindow",
    "HounsfieldWindowD",
    "HounsfieldWindowDict",
    "HounsfieldWindowd",
    "RandNormalSliceD",
    "RandNormalSliceDict",
    "RandNormalSliced",
    "slice_coverage",
    "stack_slices",
    "volume_slices",
]
from multiad_monai.transforms.volume_chains import INTENSITY_PRESETS, LoadVolumed, slice_transforms_2d, volume_transforms

__all__ += ["INTENSITY_PRESETS", "LoadVolumed", "slice_transforms_2d", "volume_transforms"]
