"""The transformer stack (decoder LM, encoder classifier, ViT) and its config."""

from attnzoo.models.config import ModelConfig
from attnzoo.models.transformer import Block, Transformer, patchify

__all__ = ["Block", "ModelConfig", "Transformer", "patchify"]
