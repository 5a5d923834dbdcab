"""`cultvlm data collect`: against a fake Wikimedia Commons on 127.0.0.1 that answers in the
MediaWiki API's real shapes (formatversion 2: search, categorymembers, imageinfo with
extmetadata) and serves small images."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_cultvlm.data import collect as collect_module
from mlx_cultvlm.data.collect import command, is_free_license, plain_text

DELAY = 0.02

FILES = {  # pageid: (title, mime, extmetadata values)
    101: ("File:Cheburashka 1.jpg", "image/jpeg", {
        "Artist": '<a href="//commons.wikimedia.org/wiki/User:Ivan" title="User:Ivan">Ivan &amp; Co</a>',
        "LicenseShortName": "CC BY-SA 4.0", "License": "cc-by-sa-4.0",
        "LicenseUrl": "https://creativecommons.org/licenses/by-sa/4.0"}),
    102: ("File:Cheburashka 2.png", "image/png", {
        "Artist": "Anna", "LicenseShortName": "CC0", "License": "cc0",
        "LicenseUrl": "http://creativecommons.org/publicdomain/zero/1.0/deed.en"}),
    103: ("File:Cheburashka NC.jpg", "image/jpeg", {
        "Artist": "Carl", "LicenseShortName": "CC BY-NC-SA 2.0", "License": "cc-by-nc-sa-2.0"}),
    104: ("File:Cheburashka poster.jpg", "image/jpeg", {
        "Artist": "Studio", "LicenseShortName": "Fair use", "NonFree": "true"}),
    105: ("File:Cheburashka.pdf", "application/pdf", {"LicenseShortName": "CC BY 4.0", "License": "cc-by-4.0"}),
    106: ("File:Чебурашка.jpg", "image/jpeg", {
        "Artist": "<i>Неизвестный</i> автор", "LicenseShortName": "Public domain", "License": "pd"}),
    107: ("File:Cheburashka 3.jpg", "image/jpeg", {
        "Artist": "<span class=\"fn\">Bob</span>", "LicenseShortName": "CC BY 2.0", "License": "cc-by-2.0",
        "LicenseUrl": "https://creativecommons.org/licenses/by/2.0"}),
}
CATEGORY = [101, 103, 104]
SEARCH = {"Чебурашка": [106, 105, 107], "Cheburashka": [102, 101, 107]}
PAGE = 2  # results per page, so that `continue` is exercised


def image_bytes(pageid: int, mime: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (pageid % 256, 80, 160)).save(buffer, "PNG" if mime == "image/png" else "JPEG")
    return buffer.getvalue()


class FakeCommons:
    """What the fake answers, and a log of what it was asked."""

    def __init__(self):
        self.requests: list[dict] = []
        self.api_script: list[str] = []  # one action per API request: 429, maxlag, 500, html
        self.api_always: str | None = None
        self.truncate: set[int] = set()  # image pageids whose body is cut short
        self.slow_once: set[int] = set()  # image pageids answered too slowly, once
        self.url = ""

    def images_fetched(self) -> list[int]:
        return [int(r["path"].rsplit("/", 1)[1].split(".")[0]) for r in self.requests
                if r["path"].startswith(("/images/", "/thumb/"))]

    def api_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"] == "/w/api.php"]


def _paged(ids: list[int], offset: int, key: str, make):
    chunk = ids[offset:offset + PAGE]
    answer = {"batchcomplete": True, "query": {key: [make(i) for i in chunk]}}
    if offset + PAGE < len(ids):
        answer["continue"] = {("sroffset" if key == "search" else "cmcontinue"): offset + PAGE,
                              "continue": "-||"}
    return answer


def api_answer(state: FakeCommons, q: dict) -> dict:
    if q.get("list") == "search":
        name = re.match(r'"(.+)"', q["srsearch"]).group(1)
        return _paged(SEARCH.get(name, []), int(q.get("sroffset", 0)), "search", lambda i: {
            "ns": 6, "title": FILES[i][0], "pageid": i, "size": 1000, "wordcount": 3,
            "snippet": "a <span class=\"searchmatch\">match</span>", "timestamp": "2020-01-01T00:00:00Z"})
    if q.get("list") == "categorymembers":
        ids = CATEGORY if q["cmtitle"] == "Category:Cheburashka" else []
        return _paged(ids, int(q.get("cmcontinue", 0)), "categorymembers",
                      lambda i: {"pageid": i, "ns": 6, "title": FILES[i][0]})
    if q.get("prop") == "imageinfo":
        pages = []
        for pageid in map(int, q["pageids"].split("|")):
            title, mime, meta = FILES[pageid]
            ext = "png" if mime == "image/png" else "jpg"
            info = {"size": len(image_bytes(pageid, mime)), "width": 32, "height": 24,
                    "url": f"{state.url}/images/{pageid}.{ext}",
                    "descriptionurl": f"https://commons.wikimedia.org/wiki/{title.replace(' ', '_')}",
                    "descriptionshorturl": f"https://commons.wikimedia.org/w/index.php?curid={pageid}",
                    "mime": mime,
                    "extmetadata": {k: {"value": v, "source": "commons-desc-page"} for k, v in meta.items()}}
            if pageid == 101:  # a thumbnail URL, as asked for with iiurlwidth
                info.update(thumburl=f"{state.url}/thumb/101.jpg", thumbwidth=32, thumbheight=24)
            pages.append({"pageid": pageid, "ns": 6, "title": title, "imagerepository": "local",
                          "imageinfo": [info]})
        pages.sort(key=lambda p: p["title"])  # the API's order, not the request's
        return {"batchcomplete": True, "query": {"pages": pages}}
    return {"error": {"code": "badvalue", "info": "unrecognised query"}}


@pytest.fixture
def commons():
    state = FakeCommons()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, status, body: bytes, kind: str, headers=(), length=None):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            state.requests.append({"path": url.path, "q": q, "ua": self.headers.get("User-Agent"),
                                   "time": time.monotonic()})
            if url.path == "/w/api.php":
                action = state.api_script.pop(0) if state.api_script else state.api_always
                if action == "429":
                    return self.send(429, b"Too many requests", "text/plain", [("Retry-After", "0.3")])
                if action == "500":
                    return self.send(500, b"oops", "text/plain")
                if action == "403":  # Wikimedia's answer to a User-Agent without a contact
                    return self.send(403, b"Please set a user-agent and respect our robot policy", "text/plain")
                if action == "maxlag":
                    body = {"error": {"code": "maxlag", "info": "Waiting for a database server: 6 seconds lagged."}}
                    return self.send(200, json.dumps(body).encode(), "application/json; charset=utf-8",
                                     [("Retry-After", "0.1"), ("X-Database-Lag", "6")])
                if action == "html":
                    return self.send(200, b"<!DOCTYPE html><html><body>Sign in to Wi-Fi</body></html>",
                                     "text/html; charset=utf-8")
                body = json.dumps(api_answer(state, q), ensure_ascii=False).encode()
                return self.send(200, body, "application/json; charset=utf-8")
            pageid = int(url.path.rsplit("/", 1)[1].split(".")[0])
            data = image_bytes(pageid, FILES[pageid][1])
            if pageid in state.slow_once:
                state.slow_once.discard(pageid)
                time.sleep(1.0)
            if pageid in state.truncate:
                self.close_connection = True
                return self.send(200, data[: len(data) // 2], FILES[pageid][1], length=len(data))
            self.send(200, data, FILES[pageid][1])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *args: None  # a client that timed out closed the socket: fine
    state.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "entities.json"
    path.write_text(json.dumps({"entities": [
        {"id": "cheburashka", "names": {"ru": ["Чебурашка"], "en": ["Cheburashka"]},
         "commons_category": "Cheburashka"},
        {"id": "gena", "names": {"ru": ["Крокодил Гена"], "en": ["Gena the Crocodile"]}},
    ]}, ensure_ascii=False), encoding="utf-8")
    return path


def run_collect(commons, catalog, images, *extra, env=None):
    args = ["cheburashka", "--limit", "3", "--catalog", str(catalog), "--images-root", str(images),
            "--delay", str(DELAY), "--timeout", "5", *extra]
    if env is None:
        args += ["--endpoint", f"{commons.url}/w/api.php"]
    return CliRunner().invoke(command, args, env=env)


def records(images) -> list[dict]:
    path = images / "cheburashka" / "sources.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_downloads_free_images_with_sources_and_credits(commons, catalog, tmp_path):
    images = tmp_path / "images"
    result = run_collect(commons, catalog, images)
    assert result.exit_code == 0, result.output
    folder = images / "cheburashka"
    # Best first: the category (101 free, 103 NC, 104 fair use), then the search (106 free,
    # 105 a PDF, 107 free); 102 would be the fourth.
    assert sorted(p.name for p in folder.iterdir()) == [
        "CREDITS.md", "commons_101.jpg", "commons_106.jpg", "commons_107.jpg", "sources.jsonl"]
    recs = records(images)
    assert [r["pageid"] for r in recs] == [101, 106, 107]
    first = recs[0]
    assert first == {
        "file": "commons_101.jpg", "title": "File:Cheburashka 1.jpg",
        "source_url": f"{commons.url}/thumb/101.jpg",
        "description_url": "https://commons.wikimedia.org/wiki/File:Cheburashka_1.jpg",
        "author": "Ivan & Co", "license": "CC BY-SA 4.0",
        "license_url": "https://creativecommons.org/licenses/by-sa/4.0", "source": "commons",
        "pageid": 101, "sha256": hashlib.sha256((folder / "commons_101.jpg").read_bytes()).hexdigest()}
    assert recs[1]["author"] == "Неизвестный автор" and recs[1]["license"] == "Public domain"
    assert recs[2]["author"] == "Bob" and recs[2]["license"] == "CC BY 2.0"
    for r in recs:
        assert hashlib.sha256((folder / r["file"]).read_bytes()).hexdigest() == r["sha256"]
        Image.open(folder / r["file"]).verify()

    credits = (folder / "CREDITS.md").read_text(encoding="utf-8")
    for r in recs:
        assert r["file"] in credits and r["author"] in credits and r["license"] in credits
    assert "[CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0)" in credits
    assert "Carl" not in credits and "Studio" not in credits

    assert "3 new image(s)" in result.stdout
    assert "2 license not free" in result.stdout and "1 not a JPEG/PNG/WebP/GIF image" in result.stdout
    # Polite: a descriptive User-Agent, maxlag, file namespace, and spaced requests.
    assert all(r["ua"].startswith("cultvlm/") and "httpx/" in r["ua"] for r in commons.requests)
    api = commons.api_requests()
    assert all(r["q"]["maxlag"] == "5" and r["q"]["format"] == "json" for r in api)
    searches = [r["q"] for r in api if r["q"].get("list") == "search"]
    assert searches and all(q["srnamespace"] == "6" for q in searches)
    assert any(q.get("sroffset") == "2" for q in searches)  # followed `continue`
    times = [r["time"] for r in commons.requests]
    assert min(b - a for a, b in zip(times, times[1:])) >= DELAY * 0.9


def test_resume_downloads_nothing_twice(commons, catalog, tmp_path):
    images = tmp_path / "images"
    env = {"CULTVLM_COMMONS_ENDPOINT": f"{commons.url}/w/api.php"}  # the endpoint from the environment
    assert run_collect(commons, catalog, images, env=env).exit_code == 0
    fetched = len(commons.requests)
    again = run_collect(commons, catalog, images, env=env)
    assert again.exit_code == 0, again.output
    assert "0 new image(s), 3 from Commons" in again.stdout
    assert len(commons.requests) == fetched  # it had enough: asked nothing

    more = run_collect(commons, catalog, images, "--limit", "10", env=env)
    assert more.exit_code == 0, more.output
    assert commons.images_fetched() == [101, 106, 107, 102]  # only the one it lacked
    assert [r["pageid"] for r in records(images)] == [101, 106, 107, 102]
    assert (images / "cheburashka" / "commons_102.png").is_file()
    assert "found fewer than --limit 10" in more.stdout


def test_failed_download_leaves_nothing_half_recorded(commons, catalog, tmp_path):
    images = tmp_path / "images"
    commons.truncate = {106}  # the connection drops mid-file, every time
    result = run_collect(commons, catalog, images, "--retries", "1")
    assert result.exit_code == 1
    assert "gave up after 2 tries" in result.output and "/images/106.jpg" in result.output
    folder = images / "cheburashka"
    assert [r["pageid"] for r in records(images)] == [101]
    assert sorted(p.name for p in folder.iterdir()) == ["CREDITS.md", "commons_101.jpg", "sources.jsonl"]

    commons.truncate = set()
    again = run_collect(commons, catalog, images)
    assert again.exit_code == 0, again.output
    assert commons.images_fetched().count(101) == 1  # not downloaded again
    assert [r["pageid"] for r in records(images)] == [101, 106, 107]


def test_run_killed_before_the_rename_records_nothing(commons, catalog, tmp_path, monkeypatch):
    images = tmp_path / "images"
    real_check = collect_module.load_image
    calls = []

    def killed_on_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were stopped with the file half-placed
        return real_check(path)

    monkeypatch.setattr(collect_module, "load_image", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        collect_module.collect("cheburashka", catalog, images, 3, endpoint=f"{commons.url}/w/api.php",
                               delay=DELAY)
    folder = images / "cheburashka"
    assert (folder / ".commons_106.jpg.part").exists() and not (folder / "commons_106.jpg").exists()
    assert [r["pageid"] for r in records(images)] == [101]

    monkeypatch.setattr(collect_module, "load_image", real_check)
    new, held, _ = collect_module.collect("cheburashka", catalog, images, 3,
                                          endpoint=f"{commons.url}/w/api.php", delay=DELAY)
    assert (new, held) == (2, 3)
    assert not list(folder.glob(".*.part"))
    assert [r["pageid"] for r in records(images)] == [101, 106, 107]


def test_torn_sources_line_is_repaired(commons, catalog, tmp_path):
    images = tmp_path / "images"
    assert run_collect(commons, catalog, images, "--limit", "1").exit_code == 0
    sources = images / "cheburashka" / "sources.jsonl"
    with open(sources, "ab") as f:
        f.write(b'{"file": "commons_106.jpg", "tit')  # a crash mid-append
    result = run_collect(commons, catalog, images, "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "torn last line" in result.stderr
    assert [r["pageid"] for r in records(images)] == [101, 106]


def test_429_with_retry_after_maxlag_and_a_timeout_are_retried(commons, catalog, tmp_path):
    images = tmp_path / "images"
    commons.api_script = ["429", "maxlag"]
    commons.slow_once = {107}
    result = run_collect(commons, catalog, images, "--timeout", "0.4")
    assert result.exit_code == 0, result.output
    assert [r["pageid"] for r in records(images)] == [101, 106, 107]
    api = commons.api_requests()
    assert api[0]["q"] == api[1]["q"] == api[2]["q"]  # the same request, three times
    assert api[1]["time"] - api[0]["time"] >= 0.3  # Retry-After: 0.3 honoured
    assert api[2]["time"] - api[1]["time"] >= 0.1  # maxlag's Retry-After: 0.1 honoured
    assert commons.images_fetched().count(107) == 2
    assert "HTTP 429" in result.stderr and "maxlag" in result.stderr and "ReadTimeout" in result.stderr


def test_server_errors_give_up_after_bounded_retries(commons, catalog, tmp_path):
    commons.api_always = "500"
    result = run_collect(commons, catalog, tmp_path / "images", "--retries", "2")
    assert result.exit_code == 1
    assert "gave up after 3 tries (last: HTTP 500)" in result.output
    assert len(commons.api_requests()) == 3


def test_html_answer_is_a_clear_error(commons, catalog, tmp_path):
    commons.api_always = "html"
    result = run_collect(commons, catalog, tmp_path / "images")
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert f"{commons.url}/w/api.php" in message and "HTML" in message and "captive portal" in message


def test_unknown_id_suggests_the_closest(catalog, tmp_path):
    result = CliRunner().invoke(command, ["cheburaska", "--catalog", str(catalog),
                                          "--images-root", str(tmp_path / "images")])
    assert result.exit_code == 1
    assert "no entity 'cheburaska'" in result.output and "did you mean 'cheburashka'?" in result.output
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("code, short, non_free, free", [
    ("cc-by-sa-4.0", "CC BY-SA 4.0", "", True),
    ("cc-by-2.0", "CC BY 2.0", "", True),
    ("cc-by-sa-3.0-de", "CC BY-SA 3.0 DE", "", True),
    ("cc0", "CC0", "", True),
    ("pd", "Public domain", "", True),
    ("", "Public domain", "", True),
    ("cc-by-nc-sa-2.0", "CC BY-NC-SA 2.0", "", False),
    ("cc-by-nd-4.0", "CC BY-ND 4.0", "", False),
    ("", "Fair use", "true", False),
    ("cc-by-sa-4.0", "CC BY-SA 4.0", "true", False),
    ("gfdl", "GFDL", "", False),
    ("", "", "", False),
])
def test_license_filter(code, short, non_free, free):
    assert is_free_license(code, short, non_free) is free


def test_plain_text_strips_html():
    assert plain_text('<a href="x">Ivan</a> &amp; <b>Co</b>\n') == "Ivan & Co"
