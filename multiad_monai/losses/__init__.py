from .adversarial import DiscriminatorLoss, StudentAdversarialLoss
from .distillation import CosineDistillationLoss
