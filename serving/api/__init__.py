"""HTTP layer: OpenAI routes, request parsing and response formatting."""
