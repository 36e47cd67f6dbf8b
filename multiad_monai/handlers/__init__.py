from .overlay import heat_colormap, render_overlay, save_png
from .threshold import NormalThresholdHandler
from .writers import MetricsJSONWriter, OverlayWriter, ScoreTableWriter, atomic_write_text, normalized_score
from .fusion_fit import FusionFitHandler, fit_learned_fusion
from .normal_statistics import NormalStatisticsHandler, fit_normal_statistics
from .volume_writer import VolumeOutputWriter
from .resume import RandomStates, ResumeHandler
from .run_record import RunRecordWriter
from .checkpoint import NetworkCheckpointLoader, load_exported_network, load_network_checkpoint
from .report import EvaluationReportWriter, TensorBoardOverlayHandler, VolumeEvaluationReportWriter
