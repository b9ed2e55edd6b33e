"""gcupipe: declarative pipelines that download, quantize, validate and serve LLMs on vLLM."""

from gcupipe.errors import GateFailed, GcupipeError, RecipeError, StageError, UsageError
from gcupipe.stages.base import Problem, Stage, StageConfig, StageContext, StageOutputs

__version__ = "0.1.0"

__all__ = [
    "GateFailed",
    "GcupipeError",
    "Problem",
    "RecipeError",
    "Stage",
    "StageConfig",
    "StageContext",
    "StageError",
    "StageOutputs",
    "UsageError",
    "__version__",
]
