"""A small client for the admin API, used by the CLI and by training to publish what it trained."""

from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from adapters.errors import InvalidAdapterName
from adapters.names import parse_ref
from loraplex.errors import LoraplexError

DEFAULT_SERVER = "http://127.0.0.1:8000"
_PAGE = 1000
# Seconds to wait on the server: to connect, and for each write or read of a request and its answer. Listing, reading
# and deleting answer within a second on a working server: one silent for 30 s is stuck, or is no HTTP server, and a
# user should not wait minutes to hear it. An upload of hundreds of MiB is answered only once the server has stored
# and checked it, so it keeps the long wait.
ANSWER_TIMEOUT = 30.0
UPLOAD_TIMEOUT = 300.0


class AdminClientError(LoraplexError):
    """The server refused a request (its message is kept) or could not be reached."""

    def __init__(self, message: str, http_status: int = 503, code: str | None = "server_unreachable") -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code or "server_error"


class PushedManifest(dict[str, Any]):
    """The stored version's manifest, as the server answered it. `created` is False when the name's newest version
    already held this content (the server answers 200 instead of 201) and no new version was given; the content of
    an older version is stored as a new version, which the name then serves."""

    def __init__(self, manifest: dict[str, Any], created: bool) -> None:
        super().__init__(manifest)
        self.created = created


class AdminClient:
    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        api_key: str | None = None,
        timeout: float = ANSWER_TIMEOUT,
        upload_timeout: float = UPLOAD_TIMEOUT,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=_check_url(base_url).rstrip("/"), headers=headers, timeout=timeout)
        self._upload_timeout = upload_timeout

    def push(self, dir: Path | str, name: str) -> PushedManifest:
        """Upload a PEFT directory (adapter_config.json, adapter_model.safetensors, optional training.json)
        or a .tar.gz / .zip of one; returns the stored version's manifest."""
        # imported here: adapters.validate loads torch, which listing and deleting need not wait for
        from adapters.validate import CHECKPOINTS_DIR, CONFIG_FILE, PICKLE_SUFFIXES, TRAINING_FILE, WEIGHTS_FILE

        path = Path(dir)
        if path.is_file() and path.name.endswith((".safetensors", ".json", *PICKLE_SUFFIXES)):
            raise AdminClientError(
                f"{path} is one file of an adapter; push the directory that holds {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}, e.g. {path.parent}, or a .tar.gz / .zip of it",
                400,
                "invalid_adapter",
            )
        with ExitStack() as stack:
            if path.is_dir():
                missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
                if missing:
                    unfinished = (path / CHECKPOINTS_DIR).is_dir()
                    how = (
                        "it holds the checkpoints of an unfinished `loraplex train` run: finish it by running it "
                        "again with --resume"
                        if unfinished
                        else "write it with save_pretrained()"
                    )
                    raise AdminClientError(
                        f"{path} is not a PEFT adapter directory: {', '.join(missing)} missing ({how})",
                        400,
                        "invalid_adapter",
                    )
                fields = {"config": CONFIG_FILE, "weights": WEIGHTS_FILE}
                if (path / TRAINING_FILE).is_file():
                    fields["training"] = TRAINING_FILE
                files = {
                    field: (filename, stack.enter_context((path / filename).open("rb")))
                    for field, filename in fields.items()
                }
            elif path.is_file():
                files = {"archive": (path.name, stack.enter_context(path.open("rb")))}
            else:
                raise AdminClientError(f"{path}: no such adapter directory or archive", 400, "invalid_adapter")
            response = self._request(
                "POST", "/v1/adapters", data={"name": name}, files=files, timeout=self._upload_timeout
            )
            return PushedManifest(self._json(response), created=response.status_code == 201)

    def check_access(self) -> None:
        """Raise unless the server answers and accepts this client's key on the admin routes (a server still
        loading its model counts as ready: it will be by the time a training run pushes)."""
        try:
            self._call("GET", "/v1/adapters", params={"limit": 1})
        except AdminClientError as exc:
            if exc.code != "not_ready":
                raise

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every stored version of `name`, oldest first (the last is the one `name` serves): version, sha256,
        created_at, state. Follows the server's pages (newest first); a version stored while they are read is left
        out, one deleted meanwhile may be left out, and none is listed twice."""
        listed: list[dict[str, Any]] = []
        params: dict[str, Any] = {"versions_limit": _PAGE}
        while True:
            page = self.version_page(name, **params)
            listed.extend(page["versions"])
            if page["versions_next"] is None:
                return listed[::-1]
            params["after"] = page["versions_next"]

    def version_page(self, name: str, versions_limit: int = 100, after: int | None = None) -> dict[str, Any]:
        """One page of `name`'s versions, newest first, older than version `after`: the manifest `name` (or
        `name@N`) means, `versions`, `versions_next` (the `after` of the next page; None after the oldest) and
        `versions_total`."""
        params: dict[str, Any] = {"versions_limit": versions_limit}
        if after is not None:
            params["versions_after"] = after
        return self._call("GET", _adapter_path(name), params=params)

    def list(self) -> list[dict[str, Any]]:
        """Every adapter's newest version, following the pages."""
        manifests: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": _PAGE}
        while True:
            page = self._call("GET", "/v1/adapters", params=params)
            manifests.extend(page["data"])
            if page["next"] is None:
                return manifests
            params["after"] = page["next"]

    def remove(self, name: str) -> int:
        """Delete 'name' (every version) or 'name@N'; returns how many versions went."""
        return self._call("DELETE", _adapter_path(name))["versions_deleted"]

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._json(self._request(method, url, **kwargs))

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self._not_loraplex(response, "not JSON") from None

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            # connected, then no answer, or an upload no longer read: a stuck server, or no HTTP server at all
            seconds = kwargs.get("timeout", self._http.timeout.read)
            raise AdminClientError(
                f"the server at {self._http.base_url} did not answer {method} {url} within {seconds:g} s: check that a "
                "loraplex server is running there and is not stuck, then retry"
            ) from exc
        except httpx.HTTPError as exc:
            raise AdminClientError(f"cannot reach the server at {self._http.base_url}: {exc}") from exc
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
            message, code = error["message"], error.get("code")
        except (ValueError, KeyError, TypeError):
            raise self._not_loraplex(response, "not a loraplex error") from None
        raise AdminClientError(message, response.status_code, code)

    def _not_loraplex(self, response: httpx.Response, what: str) -> AdminClientError:
        """An answer no loraplex server gives: another service on that port, or a proxy's own error page. Its
        status is what helps; of its body, only the first line of plain text (never a page of HTML)."""
        text = response.text.strip()
        quoted = "" if not text or "html" in response.headers.get("content-type", "") else text.splitlines()[0][:200]
        return AdminClientError(
            f"the server at {self._http.base_url} answered {response.request.method} {response.request.url.path} "
            f"with {response.status_code} {response.reason_phrase}, {what}"
            + (f" ({quoted!r})" if quoted else "")
            + ": is it a loraplex server (or a proxy in front of one)?",
            response.status_code,
            None,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _check_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host. Checked here because httpx refuses others only at the first
    request, in words that do not say what to write ('localhost:8000' reads as the scheme 'localhost'), or raises."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise AdminClientError(
            f"invalid server URL {url!r}: write it as http://HOST:PORT, e.g. {DEFAULT_SERVER}", 400, "invalid_url"
        )
    return url


def _adapter_path(ref: str) -> str:
    """The route of `ref` (NAME or NAME@N), checked first: pasted into the URL unchecked, 'bot#1' would lose '#1' as
    a fragment (a delete of every version of bot), and '/', '?' or '..' would reach other routes."""
    try:
        parse_ref(ref)
    except InvalidAdapterName as exc:
        raise AdminClientError(str(exc), exc.http_status, exc.code) from None
    return f"/v1/adapters/{ref}"
