from .anomaly_map import AnomalyMapGenerator, cosine_distance_maps, image_score
