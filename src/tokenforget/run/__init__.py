"""The run layer: one run folder's stages tied together (pipeline), their fingerprints, and variants of a run."""
