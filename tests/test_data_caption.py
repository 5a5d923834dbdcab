"""`cultvlm data caption`: offline templates, crash safety of the captions file, and the real
GigaChat SDK against a fake GigaChat on 127.0.0.1 (OAuth, file upload, chat completions)."""

from __future__ import annotations

import base64
import hashlib
import email.parser
import email.policy
import io
import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_image
from mlx_cultvlm.data import caption as caption_module
from mlx_cultvlm.data.caption import command, names_entity, offline_caption
from mlx_cultvlm.data.catalog import Entity, load_catalog

CREDENTIAL = base64.b64encode(b"fake-client-id:fake-client-secret-8f3a").decode()
TOKEN = "fake-access-token-5b1e9c0d7a"
FIELDS = {"sha256", "entity", "image", "provider", "model", "lang", "caption", "flagged"}

CHEBURASHKA_FACTS = ["Герой книги Эдуарда Успенского «Крокодил Гена и его друзья» (1966).",
                     "Зверёк с большими ушами, неизвестный науке."]


@pytest.fixture(autouse=True)
def clean_environment(tmp_path, monkeypatch):
    """No real GigaChat settings or ./.env reach these tests."""
    for key in list(os.environ):
        if key.startswith("GIGACHAT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "entities.json"
    path.write_text(json.dumps({"entities": [
        {"id": "cheburashka", "names": {"ru": ["Чебурашка"], "en": ["Cheburashka"]},
         "facts": {"ru": CHEBURASHKA_FACTS,
                   "en": ["A character from Eduard Uspensky's 1966 book.", "A small creature with big ears."]}},
        {"id": "gena", "names": {"ru": ["Крокодил Гена", "Гена"], "en": ["Gena the Crocodile"]},
         "facts": {"ru": ["Крокодил, который работает в зоопарке крокодилом."], "en": []},
         "origin": {"work": "Крокодил Гена и его друзья", "author": "Эдуард Успенский", "year": 1966}},
    ]}, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    for i in range(3):
        make_image(root / "cheburashka" / f"commons_{i}.jpg", 64, 48, seed=i)
    make_image(root / "gena" / "a.png", 64, 48, seed=10)
    make_image(root / "gena" / "b.jpg", 48, 64, seed=11)
    # Not images, or not ours to caption:
    (root / "cheburashka" / "sources.jsonl").write_text("{}\n")
    (root / "cheburashka" / "CREDITS.md").write_text("# credits\n")
    (root / "cheburashka" / ".commons_9.jpg.part").write_bytes(b"\xff\xd8half")
    make_image(root / "not_in_catalog" / "x.jpg", 32, 32)
    return root


def caption(catalog, images, *extra, env=None):
    return CliRunner().invoke(command, ["--images", str(images), "--catalog", str(catalog),
                                        "--captions", str(images.parent / "captions.jsonl"), *extra], env=env)


def lines(images) -> list[dict]:
    return [json.loads(line) for line in (images.parent / "captions.jsonl").read_text("utf-8").splitlines()]


# --- the name check ---

def test_names_entity_allows_russian_endings():
    chebu = Entity("cheburashka", {"ru": ["Чебурашка"], "en": ["Cheburashka"]})
    gena = Entity("gena", {"ru": ["Крокодил Гена"], "en": ["Gena the Crocodile"]})
    assert names_entity("Мы видим Чебурашку с апельсином.", chebu)
    assert names_entity("Рядом с Чебурашкой стоит ёлка.", chebu)
    assert names_entity("A toy of CHEBURASHKA.", chebu)
    assert names_entity("Это крокодила Гену мы видим.", gena)
    assert names_entity("Gena the Crocodile plays the accordion.", gena)
    assert not names_entity("Мультипликационный зверёк с большими ушами.", chebu)
    assert not names_entity("Здесь изображён крокодил.", gena)  # half a name is not the name


# --- offline ---

def test_offline_captions_every_image_and_names_the_entity(catalog, images):
    result = caption(catalog, images, "--provider", "offline")
    assert result.exit_code == 0, result.output
    assert "skipping" in result.stderr and "not_in_catalog" in result.stderr
    recs = lines(images)
    assert sorted(r["image"] for r in recs) == [
        "cheburashka/commons_0.jpg", "cheburashka/commons_1.jpg", "cheburashka/commons_2.jpg",
        "gena/a.png", "gena/b.jpg"]
    catalog_entities = load_catalog(catalog)
    for r in recs:
        assert set(r) == FIELDS
        assert r["provider"] == "offline" and r["model"] is None and r["lang"] == "ru" and r["flagged"] is False
        entity = catalog_entities[r["entity"]]
        assert r["image"].startswith(f"{entity.id}/")
        assert entity.name("ru") in r["caption"] and names_entity(r["caption"], entity)
        assert any(fact in r["caption"] for fact in entity.facts["ru"])
        assert r["caption"] == offline_caption(entity, r["sha256"], "ru")  # deterministic
        assert hashlib.sha256((images / r["image"]).read_bytes()).hexdigest() == r["sha256"]
    assert "5 new caption(s)" in result.stdout

    english = caption(catalog, images, "--provider", "offline", "--lang", "en")
    assert english.exit_code == 0, english.output
    recs = lines(images)
    en = [r for r in recs if r["lang"] == "en"]
    assert len(recs) == 10 and len(en) == 5
    for r in en:
        assert catalog_entities[r["entity"]].name("en") in r["caption"]
    gena_en = next(r for r in en if r["entity"] == "gena")
    assert "зоопарке" not in gena_en["caption"]  # no English facts: the origin, not a Russian fact
    chebu_en = next(r for r in en if r["entity"] == "cheburashka")
    assert any(fact in chebu_en["caption"] for fact in catalog_entities["cheburashka"].facts["en"])
    assert "From “Крокодил Гена и его друзья” by Эдуард Успенский (1966)." in gena_en["caption"]


def test_offline_wording_varies_by_image():
    entity = Entity("gena", {"ru": ["Крокодил Гена"], "en": ["Gena the Crocodile"]},
                    {"ru": ["Работает в зоопарке."], "en": ["Works at a zoo."]})
    shas = [f"{i:08x}" + "0" * 56 for i in range(20)]
    for lang in ("ru", "en"):
        captions = [offline_caption(entity, sha, lang) for sha in shas]
        assert len({c.split(entity.name(lang))[0] for c in captions}) >= 4  # several openings
        assert all(entity.name(lang) in c and names_entity(c, entity) for c in captions)
    gena_no_facts = Entity("gena", {"ru": ["Гена"]}, origin={"work": "Крокодил Гена и его друзья", "year": 1966})
    assert "«Крокодил Гена и его друзья»" in offline_caption(gena_no_facts, shas[0], "ru")


def test_rerun_adds_nothing_and_limit_is_respected(catalog, images):
    first = caption(catalog, images, "--provider", "offline", "--limit", "2")
    assert first.exit_code == 0 and len(lines(images)) == 2
    second = caption(catalog, images, "--provider", "offline")
    assert second.exit_code == 0 and len(lines(images)) == 5
    before = (images.parent / "captions.jsonl").read_bytes()
    third = caption(catalog, images, "--provider", "offline")
    assert third.exit_code == 0, third.output
    assert "0 new caption(s)" in third.stdout and "5 image(s) already captioned" in third.stdout
    assert (images.parent / "captions.jsonl").read_bytes() == before


def test_torn_last_line_is_repaired(catalog, images):
    assert caption(catalog, images, "--provider", "offline", "--limit", "3").exit_code == 0
    path = images.parent / "captions.jsonl"
    kept = path.read_bytes()
    with open(path, "ab") as f:
        f.write('{"sha256": "ab12", "entity": "gena", "caption": "Это Кр'.encode())  # cut mid-character
    result = caption(catalog, images, "--provider", "offline")
    assert result.exit_code == 0, result.output
    assert "torn last line" in result.stderr
    assert path.read_bytes().startswith(kept)
    recs = lines(images)  # every line parses
    assert len(recs) == 5 and len({r["sha256"] for r in recs}) == 5


def test_crash_mid_run_loses_at_most_the_item_in_flight(catalog, images, monkeypatch):
    real = caption_module.offline_caption
    made = []

    def crashes_on_third(*args):
        if len(made) == 2:
            raise RuntimeError("simulated crash")
        made.append(1)
        return real(*args)

    monkeypatch.setattr(caption_module, "offline_caption", crashes_on_third)
    result = caption(catalog, images, "--provider", "offline")
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert len(lines(images)) == 2  # the two finished items survived

    # A crash in the middle of writing a line: half of it reaches the disk.
    monkeypatch.setattr(caption_module, "offline_caption", real)
    real_append = caption_module.append_jsonl
    written = []

    def torn_on_second(path, record):
        if len(written) == 1:
            with open(path, "ab") as f:
                f.write(json.dumps(record, ensure_ascii=False).encode()[:25])
            raise KeyboardInterrupt
        written.append(record)
        real_append(path, record)

    monkeypatch.setattr(caption_module, "append_jsonl", torn_on_second)
    result = caption(catalog, images, "--provider", "offline")
    assert result.exit_code != 0
    monkeypatch.setattr(caption_module, "append_jsonl", real_append)
    result = caption(catalog, images, "--provider", "offline")
    assert result.exit_code == 0, result.output
    assert "torn last line" in result.stderr
    recs = lines(images)
    assert len(recs) == 5 and len({r["sha256"] for r in recs}) == 5


# --- GigaChat, through the real SDK, against a fake server ---

OK_CAPTIONS = {"Чебурашка": "На фотографии мы видим Чебурашку: большие уши, коричневая шёрстка.",
               "Крокодил Гена": "Здесь изображён крокодил Гена в шляпе, он играет на гармошке."}
NO_NAME = "На изображении мультипликационный персонаж с большими ушами."


class FakeGigaChat:
    def __init__(self):
        self.requests: list[dict] = []
        self.chat_script: list[str] = []  # per chat request: ok, no_name, 429, 500, slow
        self.files: dict[str, bytes] = {}
        self.deleted: list[str] = []
        self.url = ""

    def of(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]

    def env(self, credential=CREDENTIAL) -> dict:
        return {"GIGACHAT_CREDENTIALS": credential, "GIGACHAT_SCOPE": "GIGACHAT_API_CORP",
                "GIGACHAT_BASE_URL": f"{self.url}/api/v1", "GIGACHAT_AUTH_URL": f"{self.url}/api/v2/oauth",
                "GIGACHAT_VERIFY_SSL_CERTS": "false"}


def _multipart_file(content_type: str, body: bytes) -> tuple[bytes, dict]:
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields, data = {}, b""
    for part in message.iter_parts():
        if part.get_filename():
            data = part.get_payload(decode=True)
        else:
            fields[part.get_param("name", header="content-disposition")] = part.get_content().strip()
    return data, fields


@pytest.fixture
def gigachat():
    state = FakeGigaChat()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, status, obj, headers=()):
            body = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            auth = self.headers.get("Authorization", "")
            entry = {"path": self.path, "auth": auth, "time": time.monotonic()}
            state.requests.append(entry)
            if self.path == "/api/v2/oauth":
                entry["form"] = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                if auth != f"Basic {CREDENTIAL}" or not self.headers.get("RqUID"):
                    return self.answer(401, {"code": 6, "message": "credentials doesn't match db data"})
                return self.answer(200, {"access_token": TOKEN, "expires_at": int((time.time() + 1800) * 1000)})
            if auth != f"Bearer {TOKEN}":
                return self.answer(401, {"status": 401, "message": "Unauthorized"})
            if self.path == "/api/v1/files":
                data, fields = _multipart_file(self.headers["Content-Type"], body)
                file_id = str(uuid.uuid4())
                state.files[file_id] = data
                entry.update(file_id=file_id, purpose=fields.get("purpose"))
                return self.answer(200, {"id": file_id, "object": "file", "bytes": len(data),
                                         "created_at": int(time.time()), "filename": "x.jpg",
                                         "purpose": fields.get("purpose", "general"), "access_policy": "private"})
            if self.path.startswith("/api/v1/files/") and self.path.endswith("/delete"):
                state.deleted.append(self.path.split("/")[4])
                return self.answer(200, {"id": self.path.split("/")[4], "deleted": True})
            if self.path == "/api/v1/chat/completions":
                request = json.loads(body)
                entry["json"] = request
                action = state.chat_script.pop(0) if state.chat_script else "ok"
                entry["action"] = action
                if action == "429":
                    return self.answer(429, {"status": 429, "message": "Too many requests"}, [("Retry-After", "0.2")])
                if action == "echo":  # a 400 whose body repeats the key, in every spelling a proxy might use
                    key, decoded = self.headers.get("X-Echo", CREDENTIAL), base64.b64decode(CREDENTIAL).decode()
                    echoed = (f'{{"message": "bad request", "key": "{key.replace("/", chr(92) + "/")}", '
                              f'"url": "?key={quote(key, safe="")}", "basic": "{decoded}", '
                              f'"client": "{decoded.split(":")[1]}"}}')
                    return self.answer(400, echoed.encode())
                if action == "500":
                    return self.answer(500, {"status": 500, "message": "Internal Server Error"})
                if action == "slow":
                    time.sleep(1.2)
                user = request["messages"][-1]
                assert all(a in state.files for a in user.get("attachments", []))
                text = NO_NAME if action == "no_name" else next(
                    c for name, c in OK_CAPTIONS.items() if name in user["content"])
                return self.answer(200, {
                    "choices": [{"message": {"role": "assistant", "content": text}, "index": 0,
                                 "finish_reason": "stop"}],
                    "created": int(time.time()), "model": "GigaChat-2-Pro:2.0.28.2", "object": "chat.completion",
                    "usage": {"prompt_tokens": 300, "completion_tokens": 20, "total_tokens": 320}})
            self.answer(404, {"status": 404, "message": "no such path"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *args: None  # a client that timed out closed the socket: fine
    state.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


def giga(catalog, images, env, *extra):
    return caption(catalog, images, "--provider", "gigachat", "--timeout", "0.5", "--retry-delay", "0.05",
                   *extra, env=env)


@pytest.fixture
def three_images(tmp_path):
    root = tmp_path / "images"
    make_image(root / "cheburashka" / "one.jpg", 64, 48, seed=1)
    make_image(root / "cheburashka" / "two.png", 64, 48, seed=2)
    make_image(root / "gena" / "three.jpg", 64, 48, seed=3)
    return root


def test_gigachat_grounded_captions_survive_429_500_and_timeouts(catalog, three_images, gigachat):
    gigachat.chat_script = ["429", "ok", "500", "ok", "slow", "ok"]
    result = giga(catalog, three_images, gigachat.env())
    assert result.exit_code == 0, result.output
    recs = lines(three_images)
    assert [r["image"] for r in recs] == ["cheburashka/one.jpg", "cheburashka/two.png", "gena/three.jpg"]
    for r in recs:
        assert set(r) == FIELDS
        assert r["provider"] == "gigachat" and r["model"] == "GigaChat-2-Pro:2.0.28.2" and r["flagged"] is False
    assert recs[0]["caption"] == OK_CAPTIONS["Чебурашка"] and recs[2]["caption"] == OK_CAPTIONS["Крокодил Гена"]

    # One sign-in with the credential and scope; then the token.
    (auth,) = gigachat.of("/api/v2/oauth")
    assert auth["form"] == {"scope": "GIGACHAT_API_CORP"}
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in gigachat.requests if r["path"] != "/api/v2/oauth")
    # Each image uploaded once, as an image; each chat attaches it and grounds it in the catalog.
    uploads = gigachat.of("/api/v1/files")
    assert len(uploads) == 3
    for upload in uploads:
        Image.open(io.BytesIO(gigachat.files[upload["file_id"]])).verify()
    chats = gigachat.of("/api/v1/chat/completions")
    assert [c["action"] for c in chats] == ["429", "ok", "500", "ok", "slow", "ok"]
    assert chats[1]["time"] - chats[0]["time"] >= 0.2  # Retry-After honoured
    for chat, upload in zip(chats[0:2], [uploads[0]] * 2):
        user = chat["json"]["messages"][-1]
        assert user["attachments"] == [upload["file_id"]]
        assert "Чебурашка" in user["content"] and all(f in user["content"] for f in CHEBURASHKA_FACTS)
        assert chat["json"]["model"] == "GigaChat-2-Pro"
    assert chats[-1]["json"]["messages"][-1]["attachments"] == [uploads[2]["file_id"]]
    assert "Крокодил Гена" in chats[-1]["json"]["messages"][-1]["content"]
    assert sorted(gigachat.deleted) == sorted(u["file_id"] for u in uploads)  # cleaned up
    assert "HTTP 429" in result.stderr and "HTTP 500" in result.stderr and "ReadTimeout" in result.stderr


def test_gigachat_caption_without_the_name_is_retried_then_flagged(catalog, three_images, gigachat):
    gigachat.chat_script = ["no_name", "no_name", "no_name", "ok"]
    result = giga(catalog, three_images, gigachat.env(), "--limit", "2")
    assert result.exit_code == 0, result.output
    first, second = lines(three_images)
    assert first["flagged"] is True and first["reason"] == "caption does not name the entity"
    assert first["caption"] == NO_NAME
    assert second["flagged"] is False and second["caption"] == OK_CAPTIONS["Чебурашка"]
    chats = gigachat.of("/api/v1/chat/completions")
    assert len(chats) == 4  # each image asked twice at most
    assert "не было имени «Чебурашка»" in chats[1]["json"]["messages"][-1]["content"]
    assert "не было имени" not in chats[0]["json"]["messages"][-1]["content"]
    assert "1 flagged" in result.stdout


def test_gigachat_bad_credential_stops_at_once(catalog, three_images, gigachat):
    wrong = base64.b64encode(b"someone:else").decode()
    result = giga(catalog, three_images, gigachat.env(credential=wrong))
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert "refused the credentials" in message and "401" in message and "--provider offline" in message
    assert len(gigachat.requests) == 1  # no retries, no uploads
    assert not (three_images.parent / "captions.jsonl").exists() or not lines(three_images)


def test_gigachat_missing_credentials_suggest_offline(catalog, three_images, gigachat):
    env = gigachat.env()
    del env["GIGACHAT_CREDENTIALS"]
    result = giga(catalog, three_images, env)
    assert result.exit_code == 1
    assert "GIGACHAT_CREDENTIALS" in result.output and "--provider offline" in result.output
    assert gigachat.requests == []


def test_gigachat_settings_from_dotenv_without_overriding_the_environment(catalog, three_images, gigachat,
                                                                          tmp_path):
    (tmp_path / ".env").write_text("\n".join(f"{k}={v}" for k, v in gigachat.env().items()) + "\n")
    result = giga(catalog, three_images, None, "--limit", "1")
    assert result.exit_code == 0, result.output
    assert len(lines(three_images)) == 1

    # A variable already set wins over the file: here a wrong credential set in the environment.
    result = giga(catalog, three_images, {"GIGACHAT_CREDENTIALS": base64.b64encode(b"x:y").decode()})
    assert result.exit_code == 1 and "refused the credentials" in result.output


def test_credential_and_token_are_never_printed_logged_or_written(catalog, three_images, gigachat, tmp_path,
                                                                  caplog, capfd):
    caplog.set_level(logging.DEBUG)
    gigachat.chat_script = ["429", "500", "no_name", "no_name", "slow"]
    outputs = [giga(catalog, three_images, gigachat.env())]
    make_image(three_images / "gena" / "four.jpg", 40, 40, seed=4)
    outputs.append(giga(catalog, three_images, gigachat.env(credential=base64.b64encode(b"a:b").decode())))
    assert outputs[0].exit_code == 0 and outputs[1].exit_code == 1
    assert any(r["auth"] == f"Bearer {TOKEN}" for r in gigachat.requests)  # the token was really in use
    assert "Token refreshed via OAuth" in caplog.text  # and the SDK's debug log was captured

    seen = [o.output for o in outputs] + [o.stderr for o in outputs] + [caplog.text, *capfd.readouterr()]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env"]
    assert any(p.name == "captions.jsonl" for p in written)
    for secret in (CREDENTIAL, TOKEN, "fake-client-secret"):
        for text in seen:
            assert secret not in text
        for path in written:
            assert secret.encode() not in path.read_bytes(), path


def test_a_key_echoed_back_in_any_spelling_is_never_printed_or_written(catalog, three_images, gigachat, tmp_path,
                                                                       capfd):
    """An error body that repeats the key JSON-escaped, URL-encoded or base64-decoded (with its
    client secret alone) is shown redacted; every log and every written file is searched."""
    from mlx_cultvlm.data.caption import secret_spellings

    gigachat.chat_script = ["echo"]
    result = giga(catalog, three_images, gigachat.env())
    assert result.exit_code == 1 and "GigaChat caption of" in result.output and "HTTP 400" in result.output
    assert "***" in result.output
    spellings = secret_spellings(CREDENTIAL)
    assert {base64.b64decode(CREDENTIAL).decode(), "fake-client-secret-8f3a", quote(CREDENTIAL, safe="")} <= spellings
    seen = [result.output, result.stderr, *capfd.readouterr()]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env"]
    for spelling in spellings | {CREDENTIAL.replace("/", "\\/")}:
        for text in seen:
            assert spelling not in text, spelling
        for path in written:
            assert spelling.encode() not in path.read_bytes(), path


def test_captions_default_to_beside_the_images_where_build_looks(catalog, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in ./data/captions.jsonl of wherever cultvlm runs
    result = CliRunner().invoke(command, ["--images", str(images), "--catalog", str(catalog), "--provider", "offline"])
    assert result.exit_code == 0, result.output
    assert len(lines(images)) == 5 and not (tmp_path / "data").exists()
