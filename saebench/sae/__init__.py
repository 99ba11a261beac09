from saebench.sae.config import SAEConfig
from saebench.sae.families import ACTIVATIONS, FAMILIES, Family
from saebench.sae.sae import SAE
from saebench.sae.sparsify import Selection

__all__ = ["ACTIVATIONS", "FAMILIES", "SAE", "SAEConfig", "Family", "Selection"]
