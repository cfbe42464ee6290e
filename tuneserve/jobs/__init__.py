"""Jobs shared by every feature that runs long work from the CLI: the store (store.py) and
the runner (runner.py). What each kind of job does lives with its feature (merge/tasks.py)."""
