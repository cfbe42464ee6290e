"""The OpenAI-compatible gateway: API, routing, engines and metrics."""
