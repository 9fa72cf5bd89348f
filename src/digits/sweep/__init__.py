"""`digits sweep`: Optuna studies whose trials are DVC experiments."""
