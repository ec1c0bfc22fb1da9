"""loomtrain: distributed training for large-scale and long-context LLM pretraining."""

__version__ = "0.1.0"
