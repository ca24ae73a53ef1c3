"""The experiment harness: config, data, model, trainer, sweeps (optional extra)."""
