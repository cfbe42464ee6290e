"""Base models: preparing the default one and describing what is served."""
