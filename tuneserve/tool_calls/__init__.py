"""Function calling shared by training, `tuneserve eval` and (next) the gateway: how tools,
calls and results become prompt text."""
