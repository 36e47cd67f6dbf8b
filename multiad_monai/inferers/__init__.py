from .anomaly_map import AnomalyMapGenerator, cosine_distance_maps, image_score
from .volume import VolumeAnomalyInferer, write_volume_outputs
