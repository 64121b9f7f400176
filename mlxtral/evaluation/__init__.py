"""Measuring quality: llama-perplexity's perplexity protocol and its KL-divergence mode.

- :mod:`.perplexity` the protocol (chunks, BOS, second-half scoring, NLL sums, standard error);
- :mod:`.kld` reference log-probability files (llama.cpp's format) and the KL statistics;
- :mod:`.report` rich tables and JSON for the command line;
- :mod:`.sample_text` a text every Python ships (``python -m mlxtral.evaluation.sample_text OUT``).
"""
from __future__ import annotations

from mlxtral.evaluation.kld import KLDResult, kl_divergence, read_base
from mlxtral.evaluation.perplexity import DEFAULT_CTX, PerplexityResult

# the protocol's entry point is mlxtral.evaluation.perplexity.perplexity (not re-exported here: the
# name is its module's) and Model.perplexity
__all__ = ["DEFAULT_CTX", "KLDResult", "PerplexityResult", "kl_divergence", "read_base"]
