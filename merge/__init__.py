"""mergekit merges, adapter combination and GGUF export (see issue: Merge and export)."""
