"""Multi-AD: cross-domain unsupervised anomaly detection on MONAI."""

__version__ = "0.1.0"

from . import data, engines, handlers, inferers, losses, metrics, networks, transforms  # noqa: E402,F401
