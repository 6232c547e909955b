"""A small client for the admin API, used by the CLI and by training to publish what it trained."""

from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from loraplex.errors import LoraplexError

DEFAULT_SERVER = "http://127.0.0.1:8000"
_PAGE = 1000


class AdminClientError(LoraplexError):
    """The server refused a request (its message is kept) or could not be reached."""

    def __init__(self, message: str, http_status: int = 503, code: str | None = "server_unreachable") -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code or "server_error"


class PushedManifest(dict[str, Any]):
    """The stored version's manifest, as the server answered it. `created` is False when the server already
    held this content under the name (it answers 200 instead of 201) and gave no new version."""

    def __init__(self, manifest: dict[str, Any], created: bool) -> None:
        super().__init__(manifest)
        self.created = created


class AdminClient:
    def __init__(self, base_url: str = DEFAULT_SERVER, api_key: str | None = None, timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def push(self, dir: Path | str, name: str) -> PushedManifest:
        """Upload a PEFT directory (adapter_config.json, adapter_model.safetensors, optional training.json)
        or a .tar.gz / .zip of one; returns the stored version's manifest."""
        # imported here: adapters.validate loads torch, which listing and deleting need not wait for
        from adapters.validate import CONFIG_FILE, PICKLE_SUFFIXES, TRAINING_FILE, WEIGHTS_FILE

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
                    raise AdminClientError(
                        f"{path} is not a PEFT adapter directory: {', '.join(missing)} missing "
                        "(write it with save_pretrained())",
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
            response = self._request("POST", "/v1/adapters", data={"name": name}, files=files)
            return PushedManifest(response.json(), created=response.status_code == 201)

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
        return self._call("GET", f"/v1/adapters/{name}", params=params)

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
        return self._call("DELETE", f"/v1/adapters/{name}")["versions_deleted"]

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._request(method, url, **kwargs).json()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminClientError(f"cannot reach the server at {self._http.base_url}: {exc}") from exc
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
            message, code = error["message"], error.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = response.text.strip() or response.reason_phrase, None
        raise AdminClientError(message, response.status_code, code)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
