"""tuneserve: train, merge and serve per-tenant LoRA specialists of one base model."""

__version__ = "0.1.0"
