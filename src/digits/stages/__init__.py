"""The DVC stages: the runner, and the train, evaluate and gate stages."""
