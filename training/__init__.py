"""QLoRA fine-tuning of per-tenant adapters (see issue: Training)."""
