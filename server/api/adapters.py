"""Admin routes for adapters: upload, list, show, delete. Needs an admin key when keys are configured.

Expects `app.state.registry` (an AdapterRegistry) and `app.state.uploads` (UploadSlots). Errors are typed
(adapters.errors) and answered by the app's one LoraplexError handler from each class's `http_status` and `code`.
"""

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from adapters.archive import extract_archive
from adapters.errors import (
    InvalidAdapterName,
    InvalidUpload,
    UnsafeAdapterFormat,
)
from adapters.manifest import Manifest, compact_json
from adapters.names import NAME_PATTERN, REF_PATTERN, parse_ref
from adapters.validate import CONFIG_FILE, PICKLE_SUFFIXES, TRAINING_FILE, WEIGHTS_FILE
from loraplex.errors import LoraplexError
from server.api.auth import require_admin
from server.api.deps import NotReady
from server.api.intake import FORM_OVERHEAD, UploadSlots, limited
from server.registry import AdapterRegistry

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], dependencies=[Depends(require_admin)])

_FILE_FIELDS = {"config": CONFIG_FILE, "weights": WEIGHTS_FILE, "training": TRAINING_FILE}
MAX_PAGE = 1000  # adapters in a page of the listing, versions in a page of an adapter's or of the broken ones
_VERSION = re.compile(r"[1-9][0-9]{0,8}")  # as a reference's `name@N`
# The path's adapter reference; its pattern is stated in the schema, and checked by parse_ref, whose messages say
# how to write one (a FastAPI check would answer with a bare pattern mismatch)
Ref = Annotated[
    str,
    PathParam(
        description="NAME (its newest version) or NAME@VERSION",
        json_schema_extra={"pattern": REF_PATTERN, "examples": ["support-bot", "support-bot@2"]},
    ),
]


def _file(description: str) -> dict[str, str]:
    return {"type": "string", "format": "binary", "description": description}


# The upload's form, read by hand (its size bounded as it streams): stated here for the schema
_UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": NAME_PATTERN, "description": "the adapter's name"},
                        "config": _file(f"{CONFIG_FILE} of the PEFT directory (with weights)"),
                        "weights": _file(f"{WEIGHTS_FILE} of the PEFT directory (with config)"),
                        "training": _file(f"{TRAINING_FILE}: the training run's metadata (optional)"),
                        "archive": _file("the PEFT directory as a .tar.gz or .zip, instead of config and weights"),
                    },
                }
            }
        },
    }
}


def _registry(request: Request) -> AdapterRegistry:
    registry: AdapterRegistry | None = getattr(request.app.state, "registry", None)
    if registry is None:  # set once the base model is loaded, which happens after the port opens
        raise NotReady("the server is still loading the base model; retry shortly")
    return registry


Registry = Annotated[AdapterRegistry, Depends(_registry)]


class _WholeFormParser(MultiPartParser):
    """Starlette's parser, noting whether the body reached its closing boundary: python-multipart stops wherever the
    body stops, and starlette keeps the parts completed before it, so a body cut inside its last part (a training.json
    cut off) was stored as a whole upload without that part, and one cut inside its weights was told they were not
    sent."""

    ended = False

    def on_end(self) -> None:
        self.ended = True


async def _read_form(request: Request, max_bytes: int) -> FormData:
    # media types are case-insensitive (RFC 9110): Multipart/Form-Data is the same type
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidUpload("send the adapter as multipart/form-data (fields: name, config, weights | archive)")
    parser = _WholeFormParser(
        request.headers, limited(request.stream(), max_bytes + FORM_OVERHEAD), max_files=4, max_fields=4
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # no boundary, too many parts, a part over its limit, bad framing
        raise InvalidUpload(
            f"the multipart body is malformed ({exc.message}); send the fields name, config and weights "
            "(or archive), one each"
        ) from exc
    if not parser.ended:
        await form.close()
        raise InvalidUpload(
            "the multipart body ends before its closing boundary (--BOUNDARY--): it was cut off inside a part; "
            "send the whole body"
        )
    keys = [key for key, _ in form.multi_items()]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:  # the form's mapping keeps the last of each: a repeated field would silently win over the first
        await form.close()
        raise InvalidUpload(f"the field(s) {repeated} are sent more than once: send each field once")
    return form


def _stage(form: FormData, dest: Path, max_bytes: int) -> Path:
    """Worker thread: write the uploaded files as a PEFT directory under `dest`; return that directory."""
    files = {key: value for key, value in form.multi_items() if isinstance(value, UploadFile)}
    if "archive" in files:
        if files.keys() & _FILE_FIELDS.keys():
            raise InvalidUpload("send either an 'archive' or 'config' + 'weights' files, not both")
        archive = dest / "upload"
        with archive.open("wb") as out:
            shutil.copyfileobj(files["archive"].file, out)
        return extract_archive(archive, dest / "extracted", max_bytes)
    missing = [f for f in ("config", "weights") if f not in files]
    if missing:
        raise InvalidUpload(f"missing file field(s) {missing}: send 'config' and 'weights', or one 'archive'")
    weights_name = files["weights"].filename or ""
    if weights_name.endswith(PICKLE_SUFFIXES):
        raise UnsafeAdapterFormat(
            f"{weights_name} is a pickle-based checkpoint and is refused; upload {WEIGHTS_FILE} (safetensors)"
        )
    peft_dir = dest / "peft"
    peft_dir.mkdir()
    for field, filename in _FILE_FIELDS.items():
        if field in files:
            with (peft_dir / filename).open("wb") as out:
                shutil.copyfileobj(files[field].file, out)
    return peft_dir


@asynccontextmanager
async def _scratch(registry: AdapterRegistry) -> AsyncIterator[Path]:
    """A scratch directory of the store for the upload's files, made and removed on a worker thread: removing them
    (the archive, and what it unpacked to, each up to --max-adapter-mb) is the disk's work in proportion to their
    size, ~0.1 s for 512 MiB, which on the event loop held every stream that long; a .tar.gz of 0.5 MB unpacks to
    512 MiB of zeros."""
    scratch = registry.store.scratch()
    path = await asyncio.to_thread(scratch.__enter__)
    try:
        yield path
    finally:  # the directory goes however the upload ended: its removal is told nothing of why
        await asyncio.to_thread(scratch.__exit__, None, None, None)


def _manifest_json(manifest: Manifest) -> dict[str, Any]:
    return manifest.model_dump(mode="json")


@router.post("", status_code=201, openapi_extra=_UPLOAD_FORM)
async def upload_adapter(request: Request, registry: Registry) -> JSONResponse:
    """201 with the new version's manifest; 200 with the newest version's when it holds the same content (an older
    version's content is stored as a new version, so that the name serves it)."""
    max_bytes = registry.store.limits.max_bytes
    uploads: UploadSlots = request.app.state.uploads
    with uploads.hold():  # before the body is read: parsing it writes the files to disk
        form = await _read_form(request, max_bytes)
        try:
            name = form.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidUpload("missing text field 'name': the adapter's name, e.g. support-bot")
            runtime = getattr(request.app.state, "runtime", None)  # set with the registry, once the base is loaded
            if runtime is not None and name == runtime.base.served_name:
                raise InvalidAdapterName(
                    f"{name!r} is the served base model's name: an OpenAI request naming it runs the base model, "
                    "never this adapter; choose another name"
                )
            async with _scratch(registry) as scratch:
                src = await asyncio.to_thread(_stage, form, scratch, max_bytes)
                manifest, created = await registry.put(name, src)
        finally:
            await form.close()
    return JSONResponse(_manifest_json(manifest), status_code=201 if created else 200)


@router.get("", response_model=dict[str, Any])
async def list_adapters(
    registry: Registry,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[str | None, Query(description="the 'next' cursor of the previous page")] = None,
    broken_limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="unreadable versions in this page")] = 100,
    broken_after: Annotated[
        str | None, Query(description="the 'broken_next' cursor of the previous page: the next unreadable versions")
    ] = None,
) -> Response:
    """The newest version of each adapter, in name order, with its state; its training metadata is shown by
    GET /v1/adapters/{name} (up to 256 KiB each: a page of them could take hundreds of megabytes). The first page
    also lists, under `broken`, a page of the stored versions that cannot be read (never served, deletable with
    DELETE), by name and version, with `broken_next` (the cursor of the next page, given as `broken_after`; null
    after the last) and `broken_total`; a request with `broken_after` lists the page it asks for."""
    cursor_after = _broken_cursor(broken_after)
    broken_page = (broken_limit, cursor_after) if after is None or cursor_after is not None else None
    # Built and encoded on a worker thread: a page of a thousand manifests of all-linear adapters (each one's modules
    # and their shapes) took ~0.2 s on the event loop, every other client's requests and streams held meanwhile
    body = await asyncio.to_thread(_listing, registry, limit, after, broken_page)
    return Response(body, media_type="application/json")


def _listing(
    registry: AdapterRegistry, limit: int, after: str | None, broken_page: tuple[int, tuple[str, int] | None] | None
) -> bytes:
    """Worker thread: the listing's JSON, `{"data", "next"}` and, with `broken_page` (its limit and cursor),
    `"broken", "broken_next", "broken_total"`."""
    manifests, cursor = registry.store.page(limit, after)
    # each entry is its manifest's JSON (built once a version) with the version's state, which changes, as its last key
    data = b",".join(m.listing_json[:-1] + b',"state":' + compact_json(registry.state(m.key)) + b"}" for m in manifests)
    body = b'{"data":[' + data + b'],"next":' + compact_json(cursor)
    if broken_page is not None:
        broken, broken_next, total = registry.store.broken_page(*broken_page)
        rest = {
            "broken": [{"key": b.key, "name": b.name, "version": b.version, "error": b.error} for b in broken],
            "broken_next": broken_next,
            "broken_total": total,
        }
        body += b"," + compact_json(rest)[1:-1]
    return body + b"}"


class InvalidCursor(LoraplexError):
    http_status = 422
    code = "invalid_request"


def _broken_cursor(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        name, version = parse_ref(value)
    except InvalidAdapterName:
        version = None
    if version is None:
        shown = value if len(value) <= 32 else value[:32] + "..."
        raise InvalidCursor(
            f"broken_after={shown!r} is not a version's key: send the broken_next of the previous page (NAME@VERSION, "
            "e.g. bot@3), or leave broken_after out for the first unreadable versions"
        )
    return name, version


def _version_cursor(value: str | None) -> int | None:
    if value is None:
        return None
    if not _VERSION.fullmatch(value):
        shown = value if len(value) <= 32 else value[:32] + "..."
        raise InvalidCursor(
            f"versions_after={shown!r} is not a version number: send the versions_next of the previous page "
            "(a version number, e.g. 41), or leave versions_after out for the newest versions"
        )
    return int(value)


@router.get("/{ref}")
async def show_adapter(
    ref: Ref,
    registry: Registry,
    versions_limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="versions in this page")] = 100,
    versions_after: Annotated[
        str | None, Query(description="the 'versions_next' cursor of the previous page: older versions follow")
    ] = None,
) -> dict[str, Any]:
    """'name': the newest version's manifest; 'name@N': that version's; both with a page of the name's versions,
    newest first, each with its state, `versions_next` (the cursor of the next, older page; null after the oldest)
    and `versions_total`. The first page looks the name up in the store: other servers sharing it may have changed
    it; the next pages read this server's index (refreshed every --store-refresh-s), each page's work its size."""
    after = _version_cursor(versions_after)
    if after is None:
        await asyncio.to_thread(registry.store.recheck, parse_ref(ref)[0])
        manifest = registry.store.resolve(ref, recheck=False)
    else:
        manifest = await registry.resolve(ref)
    versions, cursor, total = registry.store.version_page(manifest.name, versions_limit, after)
    return {
        **_manifest_json(manifest),
        "state": registry.state(manifest.key),
        "versions": [
            {
                "version": m.version,
                "sha256": m.sha256,
                "created_at": m.created_at.isoformat(),
                "state": registry.state(m.key),
            }
            for m in versions
        ],
        "versions_next": cursor,
        "versions_total": total,
    }


@router.delete("/{ref}")
async def delete_adapter(ref: Ref, registry: Registry) -> dict[str, Any]:
    """'name' deletes every version, 'name@N' one; answers how many went (not which: a name may have any number)."""
    name, version = parse_ref(ref)
    deleted = await registry.delete(ref)
    return {"name": name, "version": version, "versions_deleted": len(deleted)}
