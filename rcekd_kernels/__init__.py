"""rcekd_kernels: the RCE-KD loss (Rejuvenated Cross-Entropy for Knowledge
Distillation in recommender systems), exact and fast, on several backends."""
# ops registers the torch.library custom ops; distributed: item-sharded selection and loss
from . import distributed, ops  # noqa: F401
from ._version import __version__
from .backends import available_backends
from .backends import describe as describe_backends
from .backends.native import build_info
from .config import RCEKDConfig
from .embedding import RCEKDEmbeddingLoss, csr_exclusion, rce_kd_loss_embeddings, select_embeddings, topm_dot
from .functional import RCEKDFunction, Selection, rce_kd_loss, rce_kd_loss_gathered, select, select_from_pool
from .gathered import gathered_dot
from .modules import RCEKDLoss

__all__ = [
    "rce_kd_loss",
    "select",
    "select_from_pool",
    "rce_kd_loss_gathered",
    "gathered_dot",
    "topm_dot",
    "csr_exclusion",
    "select_embeddings",
    "rce_kd_loss_embeddings",
    "RCEKDEmbeddingLoss",
    "Selection",
    "RCEKDConfig",
    "RCEKDFunction",
    "RCEKDLoss",
    "available_backends",
    "describe_backends",
    "build_info",
    "distributed",
    "__version__",
]
