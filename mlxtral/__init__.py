"""mlxtral: a local runner for Mixtral-shaped sparse mixture-of-experts models.

    import mlxtral
    model = mlxtral.load("model.gguf")
    print(model.generate([{"role": "user", "content": "Hello"}], max_tokens=64))
"""
from __future__ import annotations

from mlxtral.config import ModelArgs
from mlxtral.errors import MlxtralError
from mlxtral.generate import GenerationResponse, GenerationStats, Session
from mlxtral.model import Model, load
from mlxtral.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "GenerationResponse",
    "GenerationStats",
    "MlxtralError",
    "Model",
    "ModelArgs",
    "SamplingParams",
    "Session",
    "load",
]
