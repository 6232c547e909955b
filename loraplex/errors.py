"""Errors of the shared foundation. Each says what is wrong and how to fix it."""


class LoraplexError(Exception):
    """Base of every error loraplex raises on purpose."""


class BaseModelError(LoraplexError):
    """The base model cannot be found or loaded (missing path, not a causal LM, missing package)."""
