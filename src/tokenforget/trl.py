"""`from tokenforget.trl import ForgettingSFTTrainer`: the drop-in's public path since 0.1, kept for users' code (the
module lives in `tokenforget.training.trl`; nothing inside the package imports this one)."""

from tokenforget.training.trl import ForgettingSFTTrainer  # noqa: F401

__all__ = ["ForgettingSFTTrainer"]
