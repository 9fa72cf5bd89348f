"""MLflow: the store, runs and their lineage, the registry, the registered model, URI look-ups."""
