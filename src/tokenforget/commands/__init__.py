"""The commands beyond `run`: compare, detect, audit, demo, plan, weak (each one typed entry function)."""
