from .evaluator import MAP_KEY, MASK_KEY, NAME_KEY, SCORE_KEY, AnomalyEvaluator
from .trainer import TEACHER_FEATURES_KEY, MultiADTrainer, loss_terms
from .volume_evaluator import FOREGROUND_KEY, SLICE_SCORES_KEY, THRESHOLD_KEY, VolumeAnomalyEvaluator
from .utils import handlers_for_rank, to_device
