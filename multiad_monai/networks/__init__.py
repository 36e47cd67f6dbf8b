from .discriminator import FeatureDiscriminator, MultiLevelDiscriminator, feature_discriminator
from .efficientnet_lite import LITE_INPUT_MEAN, LITE_INPUT_STD, EfficientNetLiteEncoder, lite_weights_path
from .fusion import LearnedFusion
from .inference_folding import fold_batch_norms, fold_zero_padding
from .inputs import input_mean, input_std
from .intensity_prior import PRIOR_COMBINATIONS, PRIOR_TAILS, IntensityPrior
from .multiad import MultiAD
from .seresnet import IMAGENET_MEAN, IMAGENET_STD, SEResNetEncoder
