"""Typed adapter errors. Each class carries its HTTP status and code, so the status table lives here, in
one place, and the server's single LoraplexError handler answers with them."""

import errno

from loraplex.errors import LoraplexError

# A message quotes what it refuses: a name, a config value, a tensor's key, each as long as the client made it
MAX_MESSAGE_CHARS = 2048


class AdapterError(LoraplexError):
    """Base of every adapter error: a bad upload, an unknown name, a failed load. A message past MAX_MESSAGE_CHARS
    (a name field of 1 MiB, a config value or a tensor's key of megabytes, quoted) is cut in its middle, keeping
    what is wrong (its start) and how to fix it (its end): those made answers, and failed loads' states, as long."""

    http_status = 400
    code = "invalid_adapter"

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            keep = MAX_MESSAGE_CHARS // 2
            message = f"{message[:keep]} [...{len(message) - 2 * keep} characters...] {message[-keep:]}"
        super().__init__(message)


class InvalidAdapterName(AdapterError):
    code = "invalid_adapter_name"


class AdapterNotFound(AdapterError):
    http_status = 404
    code = "adapter_not_found"


class AdapterTooLarge(AdapterError):
    http_status = 413
    code = "adapter_too_large"


class UnsafeAdapterFormat(AdapterError):
    """Pickle-based weights (.bin / .pt) or anything that is not safetensors."""

    http_status = 415
    code = "unsafe_adapter_format"


class UnsafeArchive(AdapterError):
    """Path traversal, links, special files, too many members or too many bytes once extracted."""

    code = "unsafe_archive"


class InvalidAdapterConfig(AdapterError):
    http_status = 422
    code = "invalid_adapter_config"


class UnsupportedAdapter(AdapterError):
    """Valid PEFT, but a feature the server cannot serve (DoRA, modules_to_save, embedding changes)."""

    http_status = 422
    code = "unsupported_adapter"


class InvalidAdapterWeights(AdapterError):
    """Tensors that are not finite, not floating point, or not lora_A / lora_B pairs."""

    http_status = 422
    code = "invalid_adapter_weights"


class IncompatibleAdapter(AdapterError):
    """The adapter does not fit the served base model (unknown module, wrong shape)."""

    http_status = 422
    code = "incompatible_adapter"


class AdapterRankTooLarge(IncompatibleAdapter):
    code = "adapter_rank_too_large"


class AdapterLoadFailed(AdapterError):
    """A stored adapter could not be read back from disk (disk error, files changed behind the server)."""

    http_status = 500
    code = "adapter_load_failed"


class TooManyPinned(AdapterError):
    """Pinning more adapters than the CPU tier holds would leave no room to serve any other."""

    http_status = 409
    code = "too_many_pinned_adapters"


class InvalidUpload(AdapterError):
    """The upload request itself is malformed (missing fields, both archive and files)."""

    code = "invalid_upload"


class TooManyUploads(AdapterError):
    """Every upload slot is taken: each upload holds its files on disk until it ends, so uploads are bounded."""

    http_status = 429
    code = "too_many_uploads"
    headers = {"Retry-After": "2"}  # noqa: RUF012 - read-only class constant


class ClientUploadShareFull(TooManyUploads):
    """The client (its key, or its peer address on a server without keys) has max_uploads_per_client uploads in
    progress: one client must not hold every upload slot while others wait."""

    code = "client_upload_share_full"

    def __init__(self, max_uploads_per_client: int) -> None:
        super().__init__(
            f"this client (its key, or its address on a server without keys) has {max_uploads_per_client} adapter "
            "uploads in progress, the most one client may have at once (--max-uploads-per-client): retry when one "
            "of them has finished"
        )


class TooManyAdaptersLoaded(AdapterError):
    """Every place in the CPU tier is held by an adapter that requests are using (or loading): loading one more
    would grow CPU memory past --max-cpu-adapters, and queued requests would otherwise hold any number."""

    http_status = 429
    code = "too_many_adapters_loaded"
    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant


class AdapterStoreUnavailable(AdapterError):
    """The shared store (an S3 bucket) did not answer, or refused this server's credentials; or the adapter
    directory cannot be one."""

    http_status = 503
    code = "adapter_store_unavailable"


class RegexCheckUnavailable(AdapterError):
    """The process that matches a config's regex (adapters.fullmatch) could not be started, or ended without an
    answer (killed by a signal): the host out of processes or memory for now, not a fault of the adapter."""

    http_status = 503
    code = "regex_check_unavailable"
    headers = {"Retry-After": "2"}  # noqa: RUF012 - read-only class constant


def disk_full(exc: BaseException) -> bool:
    """Whether an error is the disk (or the user's quota) having no room left: the server's state, not the
    upload's, whatever file was being written."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def reason(exc: BaseException) -> str:
    """What a client is told of an unexpected error: its type and message, but only an OS error's reason, since an
    OSError's message names the file (a server path; the server log has it)."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'no reason given'}"
    return f"{type(exc).__name__}: {exc}"
