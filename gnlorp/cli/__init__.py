"""The command line, `python -m gnlorp`: the parser and dispatch (main), parser helpers (args), estimate and plan
(memory), try (try_cmd), and the progress bar that follows a run's events (progress)."""
