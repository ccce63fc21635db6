"""Flax NNX models: the transformer backbone, the language model and the preference model."""

from alignment_gap.models.heads import LanguageModel, PreferenceModel, both_order_margin
from alignment_gap.models.transformer import KVCache, TransformerConfig

__all__ = ["KVCache", "LanguageModel", "PreferenceModel", "TransformerConfig",
           "both_order_margin"]
