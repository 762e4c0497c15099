"""Model parts: the LLaMA decoder (HF checkpoints in and out) and its static KV cache."""
from llava.model.llama import CheckpointError, KVCache, Llama, LlamaConfig

__all__ = ["CheckpointError", "KVCache", "Llama", "LlamaConfig"]
