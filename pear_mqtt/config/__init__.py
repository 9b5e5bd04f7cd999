"""Node configuration: models, per-mode defaults, files and the environment."""
