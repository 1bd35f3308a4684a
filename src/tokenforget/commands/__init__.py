"""The commands beyond `run`: compare, detect, audit, demo, plan (each one typed entry function)."""
