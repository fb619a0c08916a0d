"""Training: the run's loop (engine), its checkpoints (state), the events it reports, the loss, sharding over
processes, and what it logs beside metrics.jsonl (tracking, spectrum_log).

Nothing is imported here: the memory estimator reads train.loss and train.sharding, which must not pull in the
engine that imports the estimator (import `gnlorp.train.engine` for `TrainingRun`).
"""
