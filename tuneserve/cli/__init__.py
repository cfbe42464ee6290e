"""The `tuneserve` command line."""
