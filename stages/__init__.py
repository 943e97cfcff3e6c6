"""Pipeline stages: one thin module per DVC stage (params -> vitkit -> outputs -> MLflow)."""
