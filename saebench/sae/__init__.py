from saebench.sae.config import ACTIVATIONS, SAEConfig
from saebench.sae.sae import SAE
from saebench.sae.sparsify import Selection

__all__ = ["ACTIVATIONS", "SAE", "SAEConfig", "Selection"]
