from .anomaly_map import AnomalyMapGenerator, cosine_distance_maps, image_score
from .smoothing import GaussianSmoothing
from .volume import VolumeAnomalyInferer, write_volume_outputs
from .baselines import BASELINE_MAPS_KEY, BASELINE_NAMES, BASELINE_SCORES_KEY, FEATURE_KNN, INTENSITY_BASELINES, FeatureKNNBaseline, IntensityBaseline, check_baseline_names
from .volume_baselines import VolumeBaselineInferer
