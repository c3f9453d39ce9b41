"""hybridlib: a CNN ∥ BiLSTM text classifier, explored in notebooks and run per dataset with papermill."""

from hybridlib.config import Config, load_config
from hybridlib.errors import CheckpointError, ConfigError, DataError, HybridlibError, RunError

__version__ = "0.3.2"

__all__ = ["Config", "load_config", "Predictor", "HybridlibError", "ConfigError", "DataError", "CheckpointError", "RunError"]


def __getattr__(name):  # import torch-heavy modules lazily
    if name == "Predictor":
        from hybridlib.prediction import Predictor

        return Predictor
    raise AttributeError(name)
