"""Logging for the command line: one format for every command, and one third-party warning filtered out."""

import logging

# bitsandbytes 0.50 looks, on CPUs with AVX512-BF16, for an optional kernel of the `kernels` package (which
# downloads it from the Hugging Face hub) and warns at import on every start when the package is absent. Its
# built-in CPU kernel runs instead, so the warning asks a user to act on nothing; it is dropped by message,
# so any other warning of that module still shows.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_kernels_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_KERNELS_WARNING)


def quiet_third_party() -> None:
    """Install the filter; call before bitsandbytes is imported (its warning is logged at import)."""
    logging.getLogger(_BNB_CPU_LOGGER).addFilter(_not_kernels_warning)


def configure(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request says nothing new
