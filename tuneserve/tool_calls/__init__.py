"""Function calling shared by training, `tuneserve eval` and the gateway: how tools,
calls and results become prompt text (render, formats), how model text becomes OpenAI
tool calls (parse), and the decoding grammar and JSON Schema subset behind forced calls
and structured outputs (grammar, schema_subset)."""
