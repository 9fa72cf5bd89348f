"""`digits server`: the team's MLflow tracking server."""
