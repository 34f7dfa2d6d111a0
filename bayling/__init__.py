"""BayLing deployment: the small package that every stage shares.

Chat templates, prompt tokenization, the streaming detokenizer, stop strings
and placeholders, the Triton tensor contract and the engine manifest live here,
once. The stages (``bayling.build_engine``, ``bayling.model_repository``,
``bayling.client``) import from here and never from each other.
"""

__version__ = "0.1.0"
