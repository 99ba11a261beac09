"""saebench: train, evaluate, steer and trace sparse autoencoders.

import saebench as sb
model = sb.load_model("tiny")
"""

__version__ = "0.1.0"

from saebench.analysis import AnalysisConfig
from saebench.circuits import TraceResult, head_scores, induction_report, parse_component, trace_attention
from saebench.compare import (
    Matches,
    compare,
    compare_curves,
    match_features,
    pareto_front,
    splitting_tree,
    token_sample,
)
from saebench.config import HarvestConfig, RunConfig, load_config
from saebench.data import DataConfig, TokenContexts, load_contexts, pack_texts
from saebench.errors import ConfigError, DataError, HookError, ModelError, SAEBenchError
from saebench.evals.absorption import absorption
from saebench.evals.consistency import Consistency, decoder_consistency
from saebench.evals.explainers import ChatExplainer, OfflineExplainer
from saebench.evals.interp import explain_features, interpretability, score_explanations
from saebench.evals.probing import sparse_probing
from saebench.evals.settings import AbsorptionSettings, InterpSettings, ProbingSettings, TPPSettings
from saebench.evals.tasks import ProbeTask, probing_tasks
from saebench.evals.tpp import tpp
from saebench.evaluate import evaluate_sae, random_baseline, spliced_losses
from saebench.graph import AttributionGraph, attribution_graph
from saebench.harvest import ActivationStore, Harvester, harvest_to_disk, stream_activations
from saebench.interop import load_sae, load_saelens, save_saelens
from saebench.models import load_model, prompt_tokens
from saebench.pipeline import analyze, eval_from_config, harvest_from_config, train_from_config
from saebench.probe import PromptFeatures, TokenFeatures, features_firing_on
from saebench.runs import Run, SAEHome
from saebench.sae import FAMILIES, SAE, Family, SAEConfig
from saebench.steering import (
    NEUTRAL_PROMPT,
    Generation,
    Steering,
    SteeringComparison,
    compare_steering,
    generate,
    input_score,
    lens_mass_gain,
    output_score,
    rank_by_output_score,
    steer,
    steering_sweep,
)
from saebench.store import Example, Explanation, FeatureCard, FeatureStore, IntervalExamples
from saebench.sweep import grid_cells, sweep_from_config
from saebench.train import TrainConfig, train_sae, train_saes

__all__ = [
    "AbsorptionSettings",
    "ChatExplainer",
    "Explanation",
    "InterpSettings",
    "OfflineExplainer",
    "absorption",
    "explain_features",
    "interpretability",
    "score_explanations",
    "Matches",
    "compare",
    "compare_curves",
    "grid_cells",
    "match_features",
    "pareto_front",
    "splitting_tree",
    "sweep_from_config",
    "token_sample",
    "FAMILIES",
    "Family",
    "Run",
    "SAEHome",
    "eval_from_config",
    "ProbeTask",
    "ProbingSettings",
    "TPPSettings",
    "probing_tasks",
    "sparse_probing",
    "tpp",
    "load_sae",
    "load_saelens",
    "save_saelens",
    "train_from_config",
    "AnalysisConfig",
    "Example",
    "FeatureCard",
    "FeatureStore",
    "IntervalExamples",
    "PromptFeatures",
    "TokenFeatures",
    "features_firing_on",
    "analyze",
    "ActivationStore",
    "AttributionGraph",
    "attribution_graph",
    "TraceResult",
    "head_scores",
    "induction_report",
    "parse_component",
    "trace_attention",
    "Generation",
    "Steering",
    "SteeringComparison",
    "compare_steering",
    "generate",
    "NEUTRAL_PROMPT",
    "input_score",
    "lens_mass_gain",
    "output_score",
    "prompt_tokens",
    "rank_by_output_score",
    "steer",
    "steering_sweep",
    "ConfigError",
    "DataConfig",
    "DataError",
    "HarvestConfig",
    "Harvester",
    "HookError",
    "ModelError",
    "RunConfig",
    "SAE",
    "SAEConfig",
    "SAEBenchError",
    "TokenContexts",
    "TrainConfig",
    "evaluate_sae",
    "random_baseline",
    "spliced_losses",
    "Consistency",
    "decoder_consistency",
    "harvest_from_config",
    "harvest_to_disk",
    "load_config",
    "load_contexts",
    "load_model",
    "pack_texts",
    "stream_activations",
    "train_sae",
    "train_saes",
]
