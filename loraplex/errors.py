"""Errors raised on purpose. Each says what is wrong and how to fix it.

Every class carries the HTTP status and error code the server answers with, so the mapping from error to
status lives with the error, and the HTTP layer maps all of them in one handler.
"""

from pydantic_core import ErrorDetails


class LoraplexError(Exception):
    """Base of every error loraplex raises on purpose."""

    http_status: int = 500
    code: str = "internal_error"

    @property
    def error_type(self) -> str:
        return "invalid_request_error" if 400 <= self.http_status < 500 else "server_error"


class BaseModelError(LoraplexError):
    """The base model cannot be found or loaded (missing path, not a causal LM, missing package)."""

    code = "base_model_error"


SHOWN_DIGITS = 24  # a client's number in an error message: at most this many of its digits


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (a library's may run to pages), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shown_int(value: int) -> str:
    """A client's integer as an error message repeats it: whole where it is short, else its first digits and their
    count. JSON numbers have no size bound short of the parser's (thousands of digits), which a message repeated
    whole, kilobytes of them."""
    digits = str(abs(value))
    sign = "-" if value < 0 else ""
    if len(digits) <= SHOWN_DIGITS:
        return f"{sign}{digits}"
    return f"{sign}{digits[:SHOWN_DIGITS]}... ({len(digits)} digits)"


def validation_message(error: ErrorDetails) -> str:
    """A pydantic error's message, without the "Value error, " it puts before a validator's own words."""
    return str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
