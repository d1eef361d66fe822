"""Admin API against a real daemon (real Redis, tiny model): every route, auth, validation, upload safety."""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from PIL import Image

import tests.toy_trained as toy
from inspectd.daemon.app import InspectDaemon
from tests.daemon_helpers import HAZELNUT, daemon_config, png_bytes, random_png

pytestmark = pytest.mark.redis

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def start_daemon(config: Any, backbone: Any) -> InspectDaemon:
    daemon = InspectDaemon(config, backbone=backbone)
    await daemon.start()
    return daemon


def api_config(redis_url: str, prefix: str, tmp: Path, **overrides: Any) -> Any:
    (tmp / "products").mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "http": {"enabled": True, "host": "127.0.0.1", "port": 0, "token": TOKEN, "max_body_bytes": 2 * 1024 * 1024},
        "registry": {"products_dir": str(tmp / "products"), "watch": False, "references_root": str(tmp)},
        "sources": {"redis": False}, "sinks": {"redis": False},
    }
    settings.update(overrides)
    return daemon_config(redis_url, prefix, tmp, **settings)


@pytest.fixture
async def api(redis_url, key_prefix, tmp_path, tiny_backbone):  # noqa: ANN001, ANN201
    daemon = await start_daemon(api_config(redis_url, key_prefix, tmp_path), tiny_backbone)
    base = f"http://127.0.0.1:{daemon.http_port}"
    async with aiohttp.ClientSession(base) as session:
        yield daemon, session
    await daemon.shutdown()


def form(*files: tuple[str, bytes], quote: bool = True) -> aiohttp.FormData:
    data = aiohttp.FormData(quote_fields=quote)  # quote=False: raw names, as curl sends them
    for name, content in files:
        data.add_field("file", content, filename=name, content_type="application/octet-stream")
    return data


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.open(HAZELNUT / "good" / "09.png").convert("RGB").resize((64, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()


async def test_every_route_needs_the_token(api) -> None:  # noqa: ANN001
    daemon, session = api
    routes = [("GET", "/products"), ("GET", "/products/nut"), ("PUT", "/products/nut"),
              ("POST", "/products/nut/reload"), ("DELETE", "/products/nut"), ("POST", "/products/nut/references")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            async with session.request(method, path, headers=headers, data=b"id: nut") as response:
                assert response.status == 401, (method, path, headers)
                assert "Bearer" in response.headers["WWW-Authenticate"]
    assert daemon.registry.get("nut").version == 1  # nothing happened
    async with session.get("/products", headers=AUTH) as response:
        assert response.status == 200
    async with session.get("/healthz") as response:  # health stays open
        assert response.status == 200


async def test_no_token_off_loopback_is_refused(redis_url, key_prefix, tmp_path, tiny_backbone,
                                                monkeypatch) -> None:  # noqa: ANN001
    from inspectd.daemon.admin import ApiError, check_auth

    monkeypatch.delenv("INSPECTD_ADMIN_TOKEN", raising=False)
    config = api_config(redis_url, key_prefix, tmp_path)
    config.http.token = None
    daemon = InspectDaemon(config, backbone=tiny_backbone)

    class Request:
        headers: dict[str, str] = {}
        method, path, remote = "GET", "/products", "10.0.0.1"

    check_auth(Request(), daemon)  # loopback without a token: open
    config.http.host = "0.0.0.0"
    with pytest.raises(ApiError) as err:
        check_auth(Request(), daemon)
    assert err.value.status == 401


async def test_list_get_put_reload_delete(api, tmp_path) -> None:  # noqa: ANN001
    daemon, session = api
    async with session.get("/products", headers=AUTH) as response:
        listed = await response.json()
    assert {p["id"] for p in listed["products"]} == {"nut", "grid"}
    async with session.get("/products/nut", headers=AUTH) as response:
        nut = await response.json()
    assert response.status == 200 and nut["version"] == 1 and nut["status"] == "ready"
    assert nut["calibration"]["method"] == "quantile" and nut["calibration"]["normals"] == 2
    assert nut["threshold"] == pytest.approx(nut["calibration"]["max_normal"] + 0.02)
    async with session.get("/products/nope", headers=AUTH) as response:
        assert response.status == 404

    refs = Path(daemon.registry.get("nut").config.references)
    body = {"object_name": "hazelnut", "references": str(refs), "shots": 2, "threshold": {"value": 0.3}}
    async with session.put("/products/bolt", json=body, headers=AUTH) as response:
        created = await response.json()
    assert response.status == 201, created
    assert created["id"] == "bolt" and created["version"] == 1 and created["threshold"] == 0.3
    saved = yaml.safe_load((tmp_path / "products" / "bolt.yaml").read_text())
    assert saved["id"] == "bolt" and saved["references"] == str(refs)

    yaml_body = f"id: bolt\nobject_name: bolt\nreferences: {refs}\nshots: 1\n"
    async with session.put("/products/bolt", data=yaml_body, headers={**AUTH, "Content-Type": "application/yaml"}
                           ) as response:
        replaced = await response.json()
    assert response.status == 200 and replaced["version"] == 2 and replaced["shots"] == 1
    assert replaced["calibration"]["shifted_views"] == 4  # k = 1: shifted views of the one reference
    assert yaml.safe_load((tmp_path / "products" / "bolt.yaml").read_text())["shots"] == 1

    async with session.post("/products/bolt/reload", headers=AUTH) as response:
        assert response.status == 200 and (await response.json())["version"] == 3
    async with session.post("/products/nope/reload", headers=AUTH) as response:
        assert response.status == 404
    async with session.delete("/products/bolt", headers=AUTH) as response:
        assert response.status == 200 and (await response.json())["removed"] == "bolt"
    assert daemon.registry.get("bolt") is None and not (tmp_path / "products" / "bolt.yaml").exists()
    async with session.get("/products/bolt", headers=AUTH) as response:
        assert response.status == 404
    async with session.delete("/products/bolt", headers=AUTH) as response:
        assert response.status == 404


async def test_put_validation_errors_are_400_naming_the_key(api) -> None:  # noqa: ANN001
    daemon, session = api
    cases = [
        ({"object_name": "x", "treshold": {"value": 1}}, "treshold"),
        ({"threshold": {"quantile": 0.9, "marginn": 0.1}}, "threshold.marginn"),
        ({"shots": "four"}, "shots"),
        ({"id": "other"}, "id"),
    ]
    for body, key in cases:
        async with session.put("/products/nut", json=body, headers=AUTH) as response:
            answer = await response.json()
        assert response.status == 400, body
        assert answer["path"] == key and f"config error at {key}" in answer["error"], answer
    yaml_type = {**AUTH, "Content-Type": "application/yaml"}
    async with session.put("/products/nut", data="a: [unclosed", headers=yaml_type) as response:
        assert response.status == 400 and "YAML" in (await response.json())["error"]
    async with session.put("/products/nut", data="[1, 2]", headers=yaml_type) as response:
        assert response.status == 400
    async with session.put("/products/bad%2Fid", json={}, headers=AUTH) as response:
        assert response.status in (400, 404)
    async with session.put("/products/.hidden", json={}, headers=AUTH) as response:
        assert response.status == 400
    assert daemon.registry.get("nut").version == 1


async def test_upload_refuses_traversal_and_non_images(api, tmp_path) -> None:  # noqa: ANN001
    daemon, session = api
    refs = Path(daemon.registry.get("nut").config.references)
    before = sorted(p.name for p in refs.iterdir())
    outside = tmp_path / "outside"
    outside.mkdir()
    (refs / "evil.png").symlink_to(outside / "evil.png")  # a planted link must not be written through
    good = png_bytes(HAZELNUT / "good" / "10.png")
    bad_names = ["../x.png", "..\\x.png", "/tmp/abs.png", "sub/x.png", "C:\\x.png", "..", ".hidden.png",
                 "a;b.png", "notes.txt", "evil.png"]
    for name in bad_names:
        for quote in (True, False):
            async with session.post("/products/nut/references", data=form((name, good), quote=quote),
                                    headers=AUTH) as response:
                answer = await response.json()
            assert response.status == 400, (name, quote, answer)
            assert "unsafe file name" in answer["error"] or "not an image file name" in answer["error"]
    for name, content in [("fake.png", b"this is not an image at all"), ("trunc.png", good[:60]),
                          ("jpeg.png", jpeg_bytes())]:
        async with session.post("/products/nut/references", data=form((name, content)), headers=AUTH) as response:
            answer = await response.json()
        assert response.status == 400, (name, answer)
    # one bad file spoils the whole upload: nothing is written
    async with session.post("/products/nut/references", data=form(("ok.png", good), ("../y.png", good)),
                            headers=AUTH) as response:
        assert response.status == 400
    async with session.post("/products/nut/references", data=b"raw", headers=AUTH) as response:
        assert response.status == 415  # not multipart: no write takes an arbitrary content type
    big = random_png(1, size=1024)  # ~3 MB of noise > max_body_bytes
    async with session.post("/products/nut/references", data=form(("big.png", big)), headers=AUTH) as response:
        assert response.status == 413
    assert sorted(p.name for p in refs.iterdir()) == before + ["evil.png"]
    assert list(outside.iterdir()) == [] and not (tmp_path / "x.png").exists() and not Path("/tmp/abs.png").exists()
    assert daemon.registry.get("nut").version == 1


async def test_upload_adds_or_replaces_and_rebuilds(api) -> None:  # noqa: ANN001
    daemon, session = api
    refs = Path(daemon.registry.get("nut").config.references)
    files = [("10.png", png_bytes(HAZELNUT / "good" / "10.png")), ("11.jpg", jpeg_bytes())]
    async with session.post("/products/nut/references", data=form(*files), headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 201, answer
    # the product uses its first 2 references by name (00, 01): the upload is stored, said to be unused, and
    # builds no new version (it used to bump the version silently)
    assert answer["uploaded"] == ["10.png", "11.jpg"] and answer["ignored"] == ["10.png", "11.jpg"]
    assert answer["version"] == 1 and answer["references"] == ["00.png", "01.png"]
    assert sorted(p.name for p in refs.iterdir()) == ["00.png", "01.png", "10.png", "11.jpg"]
    async with session.post("/products/nut/references?replace=true",
                            data=form(("20.png", png_bytes(HAZELNUT / "good" / "20.png")),
                                      ("21.png", png_bytes(HAZELNUT / "good" / "21.png"))), headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 201 and answer["version"] == 2 and answer["references"] == ["20.png", "21.png"]
    assert sorted(p.name for p in refs.iterdir()) == ["20.png", "21.png"]
    assert not [p for p in refs.iterdir() if p.name.startswith(".")]  # no temp files left behind
    async with session.post("/products/grid/references", data=form(files[0]), headers=AUTH) as response:
        assert response.status == 409  # zero-shot product: no reference directory to write into
    async with session.post("/products/nope/references", data=form(files[0]), headers=AUTH) as response:
        assert response.status == 404
    await asyncio.sleep(0)


async def test_a_camera_jpeg_with_a_preview_picture_is_accepted_as_a_reference(api) -> None:  # noqa: ANN001
    """Pillow names a JPEG carrying an MPF preview (many cameras write one) "MPO": uploads refused it."""
    daemon, session = api
    buffer = io.BytesIO()
    picture = Image.open(HAZELNUT / "good" / "05.png").convert("RGB")
    picture.save(buffer, format="MPO", save_all=True, append_images=[picture.resize((64, 64))])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    files = form(("00.jpg", buffer.getvalue()), ("01.png", png_bytes(HAZELNUT / "good" / "01.png")))
    async with session.post("/products/nut/references?replace=true", data=files, headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 201, answer
    assert answer["references"] == ["00.jpg", "01.png"] and answer["version"] == 2


# Upload bugs found in review (each test failed before the fix).
def truncated_jpeg() -> bytes:
    """A JPEG cut half way into its scan (a copy interrupted): Pillow's verify() accepts it, decoding fails."""
    buffer = io.BytesIO()
    Image.open(HAZELNUT / "good" / "05.png").convert("RGB").resize((96, 96)).save(buffer, format="JPEG")
    whole = buffer.getvalue()
    return whole[: len(whole) // 2]


def folder(path: Path) -> dict[str, bytes]:
    """Every file in ``path``, hidden ones included (no temp or set-aside file may stay behind)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.is_dir() else {}


def multipart_put(config_text: str, *files: tuple[str, bytes]) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("config", config_text, content_type="application/yaml")
    for name, content in files:
        data.add_field("file", content, filename=name, content_type="application/octet-stream")
    return data


async def test_a_corrupt_jpeg_upload_is_400_and_writes_nothing(api, tmp_path) -> None:  # noqa: ANN001
    daemon, session = api
    refs = Path(daemon.registry.get("nut").config.references)
    before = folder(refs)
    async with session.post("/products/nut/references?replace=true", data=form(("new.jpg", truncated_jpeg())),
                            headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 400, answer
    assert "new.jpg" in answer["error"] and "not a readable image" in answer["error"], answer
    assert folder(refs) == before and daemon.registry.get("nut").version == 1  # the good references are all there
    # the multipart PUT checks the same way
    good = png_bytes(HAZELNUT / "good" / "10.png")
    async with session.put("/products/fresh", data=multipart_put("object_name: hazelnut\nshots: 2\n",
                                                                 ("a.png", good), ("b.jpg", truncated_jpeg())),
                           headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 400 and "b.jpg" in answer["error"], answer
    assert folder(tmp_path / "fresh") == {} and daemon.registry.status("fresh") is None


async def test_a_rejected_upload_puts_the_old_references_back(api, tmp_path) -> None:  # noqa: ANN001
    """The build rejects the new set (here: its holdout folder went away meanwhile): the uploaded files go, the
    replaced ones come back, so the product still builds from them (reload, restart)."""
    daemon, session = api
    refs, holdout = tmp_path / "h-refs", tmp_path / "h-holdout"
    for directory, names in ((refs, ("00", "01")), (holdout, ("02", "03"))):
        directory.mkdir()
        for name in names:
            (directory / f"{name}.png").write_bytes(png_bytes(HAZELNUT / "good" / f"{name}.png"))
    body = {"object_name": "hazelnut", "references": str(refs), "shots": 2, "threshold": {"holdout_dir": str(holdout)}}
    async with session.put("/products/h", json=body, headers=AUTH) as response:
        assert response.status == 201, await response.text()
    before = folder(refs)
    shutil.rmtree(holdout)
    new = [("10.png", png_bytes(HAZELNUT / "good" / "10.png")), ("00.png", png_bytes(HAZELNUT / "good" / "11.png"))]
    for replace in ("true", "false"):  # the set replaced; one file overwritten, one added
        async with session.post(f"/products/h/references?replace={replace}", data=form(*new),
                                headers=AUTH) as response:
            answer = await response.json()
        assert response.status == 422 and "does not exist" in answer["error"], answer
        assert folder(refs) == before, (replace, sorted(folder(refs)))
    assert daemon.registry.get("h").version == 1
    holdout.mkdir()
    shutil.copy(HAZELNUT / "good" / "02.png", holdout / "02.png")
    async with session.post("/products/h/reload", headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 200 and answer["version"] == 2 and answer["references"] == ["00.png", "01.png"], answer


async def test_a_rejected_multipart_put_puts_the_old_references_back(api, tmp_path) -> None:  # noqa: ANN001
    daemon, session = api
    good = [png_bytes(HAZELNUT / "good" / f"{i:02d}.png") for i in range(4)]
    async with session.put("/products/m", data=multipart_put("object_name: hazelnut\nshots: 2\n", ("00.png", good[0]),
                                                             ("01.png", good[1])), headers=AUTH) as response:
        assert response.status == 201, await response.text()
    before = folder(tmp_path / "m")
    assert sorted(before) == ["00.png", "01.png"]
    async with session.put("/products/m", data=multipart_put("object_name: hazelnut\nshots: 2\ndetector: nosuch\n",
                                                             ("00.png", good[2]), ("05.png", good[3])),
                           headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 422 and "nosuch" in answer["error"], answer
    assert folder(tmp_path / "m") == before
    async with session.post("/products/m/reload", headers=AUTH) as response:  # what a restart would build
        assert response.status == 200 and (await response.json())["references"] == ["00.png", "01.png"]


async def test_a_failed_product_can_be_reloaded_and_given_references(api, tmp_path) -> None:  # noqa: ANN001
    daemon, session = api
    empty = tmp_path / "bolt-refs"
    empty.mkdir()
    body = {"object_name": "bolt", "references": str(empty), "shots": 2}
    async with session.put("/products/bolt", json=body, headers=AUTH) as response:
        assert response.status == 422 and "holds no images" in (await response.json())["error"]
    async with session.post("/products/bolt/reload", headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 422 and "holds no images" in answer["error"], answer  # retried, not "not serving"
    files = [(f"{i:02d}.png", png_bytes(HAZELNUT / "good" / f"{i:02d}.png")) for i in range(2)]
    async with session.post("/products/bolt/references", data=form(*files), headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 201, answer
    assert answer["status"] == "ready" and answer["version"] == 1 and answer["references"] == ["00.png", "01.png"]


async def test_an_upload_is_not_stopped_by_the_watcher_seeing_its_files(redis_url, key_prefix, tmp_path,
                                                                          tiny_backbone) -> None:
    """registry.watch on (the default): the watcher's reload of the folder the upload just wrote used to stop the
    upload's own rebuild, answering 409 'superseded'."""
    config = api_config(redis_url, key_prefix, tmp_path,
                        registry={"products_dir": str(tmp_path / "products"), "watch": True, "debounce_s": 0.3,
                                  "references_root": str(tmp_path)})
    daemon = await start_daemon(config, tiny_backbone)
    refs = tmp_path / "s-refs"
    refs.mkdir()
    for name in ("00.png", "01.png"):
        (refs / name).write_bytes(png_bytes(HAZELNUT / "good" / name))
    reloads: list[tuple[float, bool]] = []  # (when, force) of every reload: the admin's and the watcher's
    reload = daemon.registry.reload

    async def recording_reload(product_id: str, force: bool = True) -> Any:
        reloads.append((time.monotonic(), force))
        return await reload(product_id, force=force)

    daemon.registry.reload = recording_reload
    body = {"object_name": "hazelnut", "references": str(refs), "shots": 8, "detector": toy.NAME, "mask": "none",
            "options": {"epochs": 4, "steps": 10, "step_sleep_s": 0.05}}  # a 2 s training build
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}", headers=AUTH) as session:
            async with session.put("/products/s", json=body) as response:
                assert response.status == 201, await response.text()
            deadline = time.monotonic() + 15
            while not reloads:  # the watcher is on the folder once a change there reloads s
                (refs / "notes.txt").write_text(str(time.monotonic()))
                await asyncio.sleep(0.3)
                assert time.monotonic() < deadline, "the watcher never watched the reference folder"
            await daemon.registry.settled("s", 10)
            sent = time.monotonic()
            async with session.post("/products/s/references",
                                    data=form(("07.png", png_bytes(HAZELNUT / "good" / "07.png")))) as response:
                answer = await response.json()
            done = time.monotonic()
        assert response.status == 201, answer
        assert answer["version"] == 2 and answer["references"] == ["00.png", "01.png", "07.png"], answer
        # the admin's reload and the watcher's echo of the files it wrote, both while the upload built
        assert len([at for at, force in reloads if sent < at < done and not force]) >= 2, (sent, done, reloads)
        await asyncio.sleep(1.0)
        assert daemon.registry.get("s").version == 2
    finally:
        await daemon.shutdown()


async def test_a_put_whose_file_cannot_be_saved_serves_and_says_the_change_is_not_saved(api, tmp_path) -> None:  # noqa: ANN001
    """A products folder the daemon cannot write (read-only under systemd, full): the PUT built and swapped the
    product in, then answered 500 as if nothing had happened. It answers as a PUT does, with a warning that the
    change is lost at a restart, and the product serves."""
    daemon, session = api
    (tmp_path / "products" / "newp.yaml").mkdir()  # its file cannot be written (as root, permissions would not stop it)
    (tmp_path / "newp-refs").mkdir()
    shutil.copy(HAZELNUT / "good" / "00.png", tmp_path / "newp-refs" / "00.png")
    body = {"object_name": "hazelnut", "references": str(tmp_path / "newp-refs"), "shots": 1}
    async with session.put("/products/newp", json=body, headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 201, answer
    assert answer["file"] is None and "could not be saved" in answer["warning"] and "restart" in answer["warning"]
    assert daemon.registry.get("newp") is not None


async def test_an_unexpected_error_is_a_json_500_that_points_at_the_log(api, monkeypatch, caplog) -> None:  # noqa: ANN001
    """A handler's unexpected exception answered aiohttp's text/plain 500, which API clients cannot parse."""
    daemon, session = api

    def broken(*_args: Any) -> None:  # a bug (or a disk) failing somewhere no handler expects
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(daemon.registry, "ids", broken)
    async with session.get("/products", headers=AUTH) as response:
        answer = await response.json()
    assert response.status == 500 and "RuntimeError" in answer["error"] and "log" in answer["error"]
    assert any("GET /products failed" in r.getMessage() for r in caplog.records)
