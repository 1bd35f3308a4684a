"""Training: the objectives (per-token loss functions by name), the Trainer that applies them (`trainer`), one
training from a run's settings into a stage folder (`fit`), and the TRL drop-in (`trl`)."""
