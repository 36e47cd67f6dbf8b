from .overlay import heat_colormap, render_overlay, save_png
from .threshold import THRESHOLD_SOURCES, LesionDiceThresholdHandler, NormalThresholdHandler, lesion_validation_set
from .writers import MetricsJSONWriter, OverlayWriter, ScoreTableWriter, atomic_write_text, normalized_score
from .periodic_refit import PeriodicRefitHandler
from .fusion_fit import FusionFitHandler, fit_learned_fusion
from .normal_statistics import NormalStatisticsHandler, fit_normal_statistics
from .intensity_prior import IntensityPriorHandler, fit_intensity_prior
from .volume_writer import VolumeOutputWriter
from .dicom_writer import DicomOutputWriter
from .resume import RandomStates, ResumeHandler
from .run_record import RunRecordWriter
from .epoch_summary import EpochLossSummary
from .metrics_log import log_epoch_metrics, metrics_log_line
from .checkpoint import NetworkCheckpointLoader, load_exported_network, load_network_checkpoint, load_network_state, read_network_state
from .report import EvaluationReportWriter, TensorBoardOverlayHandler, VolumeEvaluationReportWriter
