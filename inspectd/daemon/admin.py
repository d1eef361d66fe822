"""Admin HTTP API for the product registry: list/get/put/reload/delete products and upload reference images.

Every route needs ``Authorization: Bearer <token>`` when a token is configured (always off loopback).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import yaml
from aiohttp import BodyPartReader, web

from inspectd import atomic
from inspectd.daemon.config import (
    ConfigError,
    ProductConfig,
    build,
    parse_yaml,
    relative_product_paths,
    resolve_product_paths,
)
from inspectd.daemon.http_common import (
    DAEMON_KEY,
    admin_token,
    bearer_matches,
    client_address,
    foreign_origin,
    guess_limiter,
    reads_open,
)
from inspectd.daemon.registry import (
    IMAGE_SUFFIXES,
    PRODUCT_ID_RE,
    BuildError,
    BuildSuperseded,
    ProductRegistry,
    decode_reference,
)

if TYPE_CHECKING:
    from inspectd.daemon.app import InspectDaemon

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,199}$")
MAX_UPLOAD_FILES = 64
MAX_UPLOAD_FILE_BYTES = 32 * 1024 * 1024
# Pillow format -> file suffixes it may be stored under
IMAGE_FORMATS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg"),  # MPO: a JPEG with a preview
                 "BMP": (".bmp",), "TIFF": (".tif", ".tiff")}
JSON_TYPES = ("application/json",)
MAX_CONFIG_BYTES = 256 * 1024


class ApiError(Exception):
    """An error answered as ``{"error": message, ...}`` with an HTTP status."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def add_admin_routes(app: web.Application, daemon: InspectDaemon) -> None:
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/products", list_products),
        ("GET", "/products/{id}", get_product),
        ("PUT", "/products/{id}", put_product),
        ("POST", "/products/{id}/reload", reload_product),
        ("DELETE", "/products/{id}", delete_product),
        ("POST", "/products/{id}/references", upload_references),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, guarded(handler))


def guarded(handler: Handler) -> Handler:
    """Bearer-token check (constant time) and ApiError -> JSON response."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        daemon: InspectDaemon = request.app[DAEMON_KEY]
        try:
            check_auth(request, daemon)
            if daemon.registry is None:
                raise ApiError(503, "registry not started")
            return await handler(request)
        except ApiError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="inspectd"'} if exc.status == 401 else None
            return web.json_response({"error": str(exc), **exc.extra}, status=exc.status, headers=headers)

    wrapper.__name__ = handler.__name__
    return wrapper


WRITE_METHODS = ("PUT", "POST", "DELETE", "PATCH")
WRITE_BODY_TYPES = ("application/json", "application/yaml", "application/x-yaml", "text/yaml", "multipart/form-data")


def check_auth(request: web.Request, daemon: InspectDaemon) -> None:
    """Reads on a loopback bind are open; every write needs the bearer token (a web page the operator opens
    cannot send one, and its cross-site requests carry a foreign Origin); off loopback everything needs it."""
    token = admin_token(daemon)
    writing = request.method in WRITE_METHODS
    if writing and (origin := foreign_origin(request, daemon)):
        log.warning("admin API: %s %s with foreign Origin %r refused", request.method, request.path, origin)
        raise ApiError(403, f"cross-origin write refused (Origin {origin!r})")
    if not writing and reads_open(daemon):
        return  # reads on loopback stay open unless the operator configured a token
    if token is None:
        raise ApiError(401, "no admin token configured" if not writing else "writes need the admin token")
    guessing = "Authorization" in request.headers
    limiter = guess_limiter(daemon)
    if guessing and (wait := limiter.retry_after(client_address(request))):
        raise ApiError(429, f"too many wrong tokens; retry in {wait:.0f} s")
    if not bearer_matches(request, token):
        if guessing:
            limiter.failed(client_address(request))
        log.warning("admin API: %s %s from %s refused (bad or missing token)", request.method, request.path,
                    request.remote)
        raise ApiError(401, "missing or invalid bearer token")
    if writing and request.can_read_body and request.content_type not in WRITE_BODY_TYPES:
        raise ApiError(415, f"content type {request.content_type!r} not accepted for writes; use "
                            "application/json, application/yaml or multipart/form-data")


def _registry(request: web.Request) -> ProductRegistry:
    return request.app[DAEMON_KEY].registry


def _product_id(request: web.Request) -> str:
    product_id = request.match_info["id"]
    if not PRODUCT_ID_RE.match(product_id):
        raise ApiError(400, f"invalid product id {product_id!r}: letters, digits, '.', '_', '-' (max 128)")
    return product_id


def describe(registry: ProductRegistry, product_id: str) -> dict[str, Any]:
    entry = registry.get(product_id)
    out: dict[str, Any] = entry.describe() if entry else {"id": product_id}
    out["status"] = registry.status(product_id)
    out["error"] = registry.error(product_id)
    out["build"] = registry.progress(product_id)  # {fraction, note, started_at, elapsed_s} while one runs
    return out


# ------------------------------------------------------------------------------------------------ routes
async def list_products(request: web.Request) -> web.Response:
    registry = _registry(request)
    return web.json_response({"products": [describe(registry, pid) for pid in registry.ids()]})


async def get_product(request: web.Request) -> web.Response:
    registry = _registry(request)
    product_id = request.match_info["id"]
    if registry.status(product_id) is None and registry.get(product_id) is None:
        raise ApiError(404, f"unknown product {product_id!r}")
    return web.json_response(describe(registry, product_id))


async def put_product(request: web.Request) -> web.Response:
    """Create or replace a product. Waits for the build unless ``?wait=false``: then 202 at once, the build
    runs in the background (progress in GET /products/{id}); a newer PUT stops a build still running."""
    registry = _registry(request)
    product_id = _product_id(request)
    staged: StagedReferences | None = None
    if request.content_type.startswith("multipart/"):
        config, staged = await _create_with_references(request, product_id, registry)
    else:
        config = parse_product(await request.read(), request.content_type, product_id, registry)
        check_references_root(config, registry)
    created = registry.get(product_id) is None
    if request.query.get("wait", "true").lower() in ("0", "false", "no"):
        daemon: InspectDaemon = request.app[DAEMON_KEY]
        daemon.background(_build_and_save(registry, config, staged), name=f"build:{product_id}")
        await asyncio.sleep(0)  # let the build register itself, so the reply shows it
        return web.json_response(describe(registry, product_id), status=202)
    entry = await _build_staged(registry.put(config), product_id, staged)
    path, problem = await _save_file(registry, config)
    body = describe(registry, entry.id)
    body["file"] = str(path) if path else None
    if problem:
        body["warning"] = problem
    return web.json_response(body, status=201 if created else 200)


async def _save_file(registry: ProductRegistry, config: ProductConfig) -> tuple[Path | None, str]:
    """(the product file saved, "") or (None, why not): the product serves either way, so a folder that cannot be
    written (read-only, full) is said in the reply and the log, not turned into an error after the swap."""
    try:
        return await asyncio.to_thread(registry.save_product_file, config), ""
    except OSError as exc:
        problem = (f"product {config.id!r} serves, but its file could not be saved ({exc}): the change is lost at "
                   "the next restart; make registry.products_dir writable to the daemon")
        log.error("admin: %s", problem)
        return None, problem


async def reload_product(request: web.Request) -> web.Response:
    """Rebuild the product (a failed one too: its last config is retried, e.g. once its folder holds images)."""
    registry = _registry(request)
    product_id = request.match_info["id"]
    if registry.get(product_id) is None and registry.wanted(product_id) is None:
        raise ApiError(404, f"product {product_id!r} is not serving")
    await _build_or_422(registry.reload(product_id), product_id)
    return web.json_response(describe(registry, product_id))


async def delete_product(request: web.Request) -> web.Response:
    registry = _registry(request)
    product_id = request.match_info["id"]
    if not await registry.remove(product_id):
        raise ApiError(404, f"unknown product {product_id!r}")
    body: dict[str, Any] = {"removed": product_id, "file_deleted": None}
    try:
        path = await asyncio.to_thread(registry.delete_product_file, product_id) \
            if PRODUCT_ID_RE.match(product_id) else None
        body["file_deleted"] = str(path) if path else None
    except OSError as exc:
        body["warning"] = (f"product {product_id!r} is removed, but its file could not be deleted ({exc}): it comes "
                           "back at the next restart; make registry.products_dir writable to the daemon")
        log.error("admin: %s", body["warning"])
    return web.json_response(body)


async def upload_references(request: web.Request) -> web.Response:
    """Multipart image files into the product's reference directory, then rebuild.

    ``?replace=true`` removes the directory's other images. Every file is checked (name, size, an image the
    build's decoder reads whole, of the format its suffix says) before anything is written. The write is undone
    when the build rejects the new set: the uploaded files go and the replaced ones come back.
    A product whose build failed (e.g. its folder was empty) takes uploads into its configured folder too.
    """
    daemon: InspectDaemon = request.app[DAEMON_KEY]
    registry = _registry(request)
    product_id = request.match_info["id"]
    entry = registry.get(product_id)
    config = entry.config if entry is not None else registry.wanted(product_id)
    if config is None:
        raise ApiError(404, f"product {product_id!r} is not serving")
    if not config.references:
        raise ApiError(409, f"product {product_id!r} has no reference directory; PUT a config with `references`")
    directory = Path(config.references).resolve()
    replace = request.query.get("replace", "false").lower() in ("1", "true", "yes")
    per_file = min(MAX_UPLOAD_FILE_BYTES, daemon.config.decode.max_bytes)
    files = await read_uploads(request, per_file, daemon.config.http.max_body_bytes)
    for name, data in files:
        await asyncio.to_thread(check_image, name, data, daemon.config.decode.max_pixels)
    targets = [(safe_target(directory, name), data) for name, data in files]
    staged = await asyncio.to_thread(write_references, directory, targets, replace)
    written = staged.names
    log.info("product %s: %d reference image(s) uploaded%s", product_id, len(written),
             " (replacing the set)" if replace else "")
    # force=False: an upload that changes none of the references the product uses builds no new version
    entry = await _build_staged(registry.reload(product_id, force=False), product_id, staged, uploaded=written)
    body = describe(registry, product_id)
    body["uploaded"] = written
    body["ignored"] = [name for name in written if name not in entry.references]
    if body["ignored"]:
        body["note"] = (f"the product uses its first {entry.config.shots} reference image(s) by file name; "
                        f"{len(body['ignored'])} uploaded file(s) are not among them (raise `shots`, or upload "
                        "with ?replace=true)")
    return web.json_response(body, status=201)


async def _create_with_references(request: web.Request, product_id: str, registry: ProductRegistry
                                  ) -> tuple[ProductConfig, StagedReferences]:
    """A multipart PUT: a ``config`` field (YAML or JSON) and the reference images in one request. The images
    become the product's reference set in ``registry.references_root/<id>/`` (replacing what was there, which is
    put back if the build rejects the new set: see `_build_staged`)."""
    daemon: InspectDaemon = request.app[DAEMON_KEY]
    root = registry.config.references_root
    if root is None:
        raise ApiError(409, "creating a product with references over the API needs registry.references_root")
    fields: dict[str, bytes] = {}
    per_file = min(MAX_UPLOAD_FILE_BYTES, daemon.config.decode.max_bytes)
    files = await read_uploads(request, per_file, daemon.config.http.max_body_bytes, fields)
    if "config" not in fields:
        raise ApiError(400, "a multipart PUT needs a `config` field (YAML or JSON) beside the image files")
    directory = (Path(root) / product_id).resolve()
    config = parse_product(fields["config"], "application/yaml", product_id, registry)
    if config.references and Path(config.references).resolve() != directory:
        raise ApiError(400, f"config error at references: a multipart PUT stores its images in {directory}; "
                            "leave `references` out", path="references")
    for name, data in files:
        await asyncio.to_thread(check_image, name, data, daemon.config.decode.max_pixels)
    directory.mkdir(parents=True, exist_ok=True)
    targets = [(safe_target(directory, name), data) for name, data in files]
    staged = await asyncio.to_thread(write_references, directory, targets, True)
    log.info("product %s: created with %d reference image(s) in %s", product_id, len(staged.names), directory)
    config.references = str(directory)
    return config, staged


# ------------------------------------------------------------------------------------------------ helpers
def check_references_root(config: ProductConfig, registry: ProductRegistry) -> None:
    """A reference (or holdout) directory set over the API must lie under ``registry.references_root`` unless it
    is the one the serving version already uses (so an upload with ?replace=true can never empty an unrelated
    directory). Files the operator writes into products_dir may point anywhere."""
    serving = registry.get(config.id)
    root = registry.config.references_root
    for key, value, current in (("references", config.references, serving.config.references if serving else None),
                                ("threshold.holdout_dir", config.threshold.holdout_dir,
                                 serving.config.threshold.holdout_dir if serving else None)):
        if not value or (current and Path(value).resolve() == Path(current).resolve()):
            continue
        if root is None:
            raise ApiError(400, f"config error at {key}: directories cannot be set over the API without "
                                "registry.references_root (set it, or write the product file yourself)", path=key)
        resolved = Path(value).resolve()
        if not resolved.is_relative_to(Path(root).resolve()):
            raise ApiError(400, f"config error at {key}: {value!r} is not under registry.references_root {root!r}",
                           path=key)


async def _build_and_save(registry: ProductRegistry, config: ProductConfig,
                          staged: StagedReferences | None = None) -> None:
    """A background PUT: build, then persist the product file; failures are logged and shown in GET (and the
    reference files of a multipart PUT are put back when the build rejects them)."""
    try:
        await _build_staged(registry.put(config), config.id, staged)
    except ApiError:
        return  # logged by the registry; status/error are in GET /products/{id}
    await _save_file(registry, config)


async def _build_staged(build_coro: Awaitable[Any], product_id: str, staged: StagedReferences | None,
                        **extra: Any) -> Any:
    """`_build_or_422` for a build that reads ``staged`` reference files: kept when it serves (or a newer update,
    409, builds from the folder as it now is), undone when it is rejected, so a bad set never outlives the
    request (and never breaks the product at the next restart)."""
    try:
        result = await _build_or_422(build_coro, product_id, **extra)
    except ApiError as exc:
        if staged is not None:
            await asyncio.to_thread(staged.commit if exc.status == 409 else staged.rollback)
        raise
    except BaseException:
        if staged is not None:
            staged.rollback()  # (cancelled: no await)
        raise
    if staged is not None:
        await asyncio.to_thread(staged.commit)
    return result


async def _build_or_422(build_coro: Awaitable[Any], product_id: str, **extra: Any) -> Any:
    try:
        return await build_coro
    except BuildSuperseded as exc:
        raise ApiError(409, f"product {product_id!r}: {exc}; the newer update is building", **extra) from exc
    except BuildError as exc:
        raise ApiError(422, f"product {product_id!r} rejected: {exc}", **extra) from exc
    except KeyError as exc:
        raise ApiError(404, f"product {product_id!r} is not serving") from exc


def parse_product(body: bytes, content_type: str, product_id: str, registry: ProductRegistry) -> ProductConfig:
    """A ProductConfig from a JSON or YAML body; 400 naming the key path on any problem."""
    try:
        text = body.decode("utf-8")
        data = json.loads(text) if content_type in JSON_TYPES else parse_yaml(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ApiError(400, f"body is not valid {'JSON' if content_type in JSON_TYPES else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a mapping of product settings", path="")
    data.setdefault("id", product_id)
    if data["id"] != product_id:
        raise ApiError(400, f"config error at id: {data['id']!r} does not match the URL's {product_id!r}", path="id")
    try:
        config = build(ProductConfig, data, "")
    except ConfigError as exc:
        raise ApiError(400, str(exc), path=exc.path) from exc
    relative = relative_product_paths(config)  # references, holdout, learned-part files: as in a product file
    if relative and not registry.config.products_dir:
        raise ApiError(400, f"config error at {relative[0]}: must be an absolute path (no products_dir to resolve "
                       "it against)", path=relative[0])
    if relative:  # relative to products_dir, where the product is saved: its file then reads the same
        resolve_product_paths(config, Path(registry.config.products_dir))
    return config


async def read_uploads(request: web.Request, per_file: int, total: int,
                       fields: dict[str, bytes] | None = None) -> list[tuple[str, bytes]]:
    """Image files of a multipart body; with ``fields`` given, a non-file ``config`` field is accepted into it."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "expected a multipart/form-data body of image files")
    reader = await request.multipart()
    files: list[tuple[str, bytes]] = []
    received = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):  # nested multipart: refused
            raise ApiError(400, "nested multipart bodies are not accepted")
        if part.filename is None and fields is not None and part.name == "config":
            fields["config"] = bytes(await part.read(decode=False))[:MAX_CONFIG_BYTES + 1]
            if len(fields["config"]) > MAX_CONFIG_BYTES:
                raise ApiError(413, f"config field larger than {MAX_CONFIG_BYTES} bytes")
            continue
        if part.filename is None:
            raise ApiError(400, f"form field {part.name!r} is not a file")
        name = unquote(part.filename)  # clients may percent-encode; check what the name really says
        check_file_name(name)
        data = bytearray()
        while chunk := await part.read_chunk(64 * 1024):
            data += chunk
            received += len(chunk)
            if len(data) > per_file:
                raise ApiError(413, f"{name}: larger than {per_file} bytes")
            if received > total:
                raise ApiError(413, f"upload larger than {total} bytes")
        files.append((name, bytes(data)))
        if len(files) > MAX_UPLOAD_FILES:
            raise ApiError(413, f"more than {MAX_UPLOAD_FILES} files in one upload")
    if not files:
        raise ApiError(400, "no files in the upload")
    names = [n for n, _ in files]
    if len(set(names)) != len(names):
        raise ApiError(400, "duplicate file names in the upload")
    return files


def check_file_name(name: str) -> None:
    """A plain file name: no separators, no '..', not absolute, not hidden, image suffix."""
    bad = (not name or "/" in name or "\\" in name or "\0" in name or ".." in name
           or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
           or not FILE_NAME_RE.match(name))
    if bad:
        raise ApiError(400, f"unsafe file name {name!r}: a plain name (letters, digits, '.', '_', '-', ' '), "
                       "no path separators or '..'")
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        raise ApiError(400, f"{name}: not an image file name ({', '.join(IMAGE_SUFFIXES)})")


def check_image(name: str, data: bytes, max_pixels: int) -> None:
    """The bytes are an image of the format the suffix says (header and structure via Pillow) that the build's
    own decoder reads whole (Pillow's verify() barely looks at a JPEG: a truncated one passes it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
            if width * height > max_pixels:
                raise ApiError(400, f"{name}: {width}x{height} pixels is over the limit of {max_pixels}")
            image.verify()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"{name}: not a readable image ({exc})") from exc
    if fmt not in IMAGE_FORMATS:
        raise ApiError(400, f"{name}: image format {fmt} not accepted ({', '.join(IMAGE_FORMATS)})")
    if Path(name).suffix.lower() not in IMAGE_FORMATS[fmt]:
        raise ApiError(400, f"{name}: content is {fmt}, which does not match the file name")
    try:
        decode_reference(data)
    except Exception as exc:  # noqa: BLE001 - FrameError (corrupt, truncated, too many pixels) and decoder errors
        raise ApiError(400, f"{name}: not a readable image ({exc})") from exc


def safe_target(directory: Path, name: str) -> Path:
    """``directory / name`` resolved, refused unless it lies directly inside ``directory`` (no symlink escape)."""
    target = (directory / name).resolve()
    if target.parent != directory or not target.is_relative_to(directory):
        raise ApiError(400, f"unsafe file name {name!r}: resolves outside the reference directory")
    return target


@dataclass
class StagedReferences:
    """Reference files written by one request, with the files they replaced set aside under hidden names (which
    builds and the watcher ignore) until the build decides: `commit` drops the old ones, `rollback` restores."""

    directory: Path
    written: list[Path] = field(default_factory=list)
    aside: list[tuple[Path, Path]] = field(default_factory=list)  # (hidden name, original name)

    @property
    def names(self) -> list[str]:
        return sorted(p.name for p in self.written)

    def commit(self) -> None:
        for hidden, _ in self.aside:
            hidden.unlink(missing_ok=True)
        self.aside = []

    def rollback(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)
        for hidden, original in self.aside:
            hidden.replace(original)
        self.written, self.aside = [], []
        log.info("reference upload into %s undone: the previous files are back", self.directory)


def write_references(directory: Path, targets: list[tuple[Path, bytes]], replace: bool) -> StagedReferences:
    """Write each file atomically (dot-prefixed temp name, which builds and the watcher ignore), setting aside
    first every file it overwrites and, with ``replace``, the directory's other images."""
    directory.mkdir(parents=True, exist_ok=True)
    staged = StagedReferences(directory)
    keep = {t.name for t, _ in targets}
    try:
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.name in keep or replace:
                hidden = directory / f".replaced-{uuid.uuid4().hex}.tmp"
                path.replace(hidden)
                staged.aside.append((hidden, path))
        for target, data in targets:
            atomic.write_bytes(target, data)
            staged.written.append(target)
    except BaseException:
        staged.rollback()
        raise
    return staged
