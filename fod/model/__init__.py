"""The FOD model, split the anomalib way: ``torch_model`` (the level transformers and the ``FOD`` bundle),
``loss`` (the minimax loss), ``anomaly_map`` (the token scores) and ``memory`` (training features and the
reference memory). The names below are the package's public interface."""
from .anomaly_map import SCORES, inter_score, intra_score, rec_score, token_scores
from .loss import fod_loss, reconstruction_loss
from .memory import extract_features, reference_memory
from .torch_model import FOD, EncoderLayer, LevelModel, default_d_model, resolve_backend, sincos_2d

__all__ = ["FOD", "SCORES", "EncoderLayer", "LevelModel", "default_d_model", "extract_features", "fod_loss",
           "inter_score", "intra_score", "rec_score", "reconstruction_loss", "reference_memory", "resolve_backend",
           "sincos_2d", "token_scores"]
