from .overlay import heat_colormap, render_overlay, save_png
from .threshold import NormalThresholdHandler
from .writers import MetricsJSONWriter, OverlayWriter, ScoreTableWriter, atomic_write_text, normalized_score
from .fusion_fit import FusionFitHandler, fit_learned_fusion
