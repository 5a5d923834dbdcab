"""`cultvlm data caption`: a description of every image, grounded in the catalog, for training.

Each image under `<images>/<entity_id>/` without a caption in the chosen language gets one line
in the captions file (JSON lines, read by the dataset builder):

    {"sha256": ..., "entity": "cheburashka", "image": "cheburashka/commons_1.jpg",
     "provider": "gigachat", "model": "GigaChat-2-Pro", "lang": "ru", "caption": "...",
     "flagged": false}                  # flagged true adds "reason"

Captions are keyed by the image's sha256 (and language), so renaming a file costs nothing and
a re-run only does what is missing. Each line is written in one go and fsync'ed: a killed run
loses at most the image in flight, and a torn last line is cut away on the next run.

Providers: `offline` writes template captions from the catalog's names and facts (no network);
`gigachat` uploads the image to GigaChat with the entity's names and facts as grounding.
The GigaChat credential and access token are never printed, logged or written anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import httpx

from ..errors import CultvlmError
from ..files import NOT_UTF8, append_jsonl, printable, read_jsonl, utf8_name
from ..images import load_image
from .catalog import LANGS, Entity, folder_id, load_catalog

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
DEFAULT_GIGACHAT_MODEL = "GigaChat-2-Pro"  # reads images; GIGACHAT_MODEL picks another
UPLOAD_MAX_SIDE = 1600  # pixels: plenty for a description, a small upload
MAX_WAIT = 60.0  # seconds: the longest single wait between retries
NOT_NAMED = "caption does not name the entity"


@dataclass
class Item:
    entity: Entity
    path: Path
    image: str  # relative to the images root, with '/'
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_images(images_root: Path, catalog: dict[str, Entity]) -> list[Item]:
    """Image files in `<root>/<entity id>/`, in a stable order. Records, credits and
    temporary files beside them are not images and are left alone."""
    if not images_root.is_dir():
        raise CultvlmError(f"{images_root}: no such images folder")
    items = []
    for folder in sorted(p for p in images_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entity = catalog.get(folder_id(folder.name))
        if entity is None:
            click.echo(f"note: skipping {folder}: no entity {folder.name!r} in the catalog", err=True)
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                items.append(Item(entity, path, f"{folder.name}/{path.name}", file_sha256(path)))
    return items


# --- does a caption name the entity? ---

def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower().replace("ё", "е"))


def _stem(word: str) -> str:
    """Enough of a name's word to survive Russian endings: Чебурашка -> Чебураш (Чебурашку,
    Чебурашкой), Гена -> Ген (Гену, Геной). A stand-in until a proper scorer exists."""
    if len(word) > 5:
        return word[:max(5, len(word) - 2)]
    if len(word) >= 4 and word[-1] in "аяоеиыуюйь":
        return word[:-1]
    return word


def names_entity(caption: str, entity: Entity) -> bool:
    """True if every word of one of the entity's names starts a word of the caption."""
    words = _words(caption)
    for alias in entity.all_names():
        stems = [_stem(w) for w in _words(alias)]
        if stems and all(any(w.startswith(s) for w in words) for s in stems):
            return True
    return False


# --- offline: templates from the catalog ---

OPENINGS = {
    "ru": ["На изображении — {name}.", "Это {name}.", "Перед нами {name}.", "Здесь можно узнать: {name}.",
           "{name} на этом изображении."],
    "en": ["This image shows {name}.", "Here is {name}.", "Pictured: {name}.", "This is {name}.",
           "{name}, as seen in this picture."],
}


def _origin_sentence(entity: Entity, lang: str) -> str:
    work, author, year = (entity.origin.get(k) for k in ("work", "author", "year"))
    if not work:
        return ""
    if lang == "ru":
        return f"Из произведения «{work}»" + (f", автор — {author}" if author else "") + \
            (f", {year}" if year else "") + "."
    return f"From “{work}”" + (f" by {author}" if author else "") + (f" ({year})" if year else "") + "."


def offline_caption(entity: Entity, sha256: str, lang: str) -> str:
    """A caption that names the entity and says one catalog fact; the wording is picked by the
    image's hash, so it varies between images and is the same on every run."""
    openings = OPENINGS[lang]
    pick = int(sha256[:8], 16)
    text = openings[pick % len(openings)].format(name=entity.name(lang))
    text = text[0].upper() + text[1:]
    facts = entity.facts.get(lang) or []
    extra = facts[(pick // len(openings)) % len(facts)] if facts else _origin_sentence(entity, lang)
    return f"{text} {extra}".strip()


class OfflineCaptioner:
    provider = "offline"

    def describe(self, item: Item, image, lang: str) -> tuple[str, str | None, str | None]:
        return offline_caption(item.entity, item.sha256, lang), None, None

    def close(self) -> None:
        pass


# --- GigaChat ---

SYSTEM = {
    "ru": "Ты описываешь изображения для обучающего набора данных. Отвечай по-русски, 2–3 "
          "предложения, без списков и вступлений. Не выдумывай фактов.",
    "en": "You describe images for a training dataset. Answer in English, 2-3 sentences, no lists "
          "and no preamble. Do not invent facts.",
}


def grounding_prompt(entity: Entity, lang: str, remind: bool = False) -> str:
    name = entity.name(lang)
    others = [n for n in entity.all_names() if n != name]
    facts = entity.facts.get(lang) or []
    if lang == "ru":
        lines = [f"На изображении: {name}" + (f" (другие имена: {', '.join(others)})" if others else "") + "."]
        if facts:
            lines += ["Проверенные факты:", *(f"- {f}" for f in facts)]
        lines.append(f"Опиши, что видно на изображении, и обязательно назови «{name}» по имени. "
                     "Используй только эти факты и то, что видно.")
        if remind:
            lines.append(f"В прошлом ответе не было имени «{name}». Назови его явно.")
    else:
        lines = [f"The image shows: {name}" + (f" (also known as: {', '.join(others)})" if others else "") + "."]
        if facts:
            lines += ["Verified facts:", *(f"- {f}" for f in facts)]
        lines.append(f"Describe what is visible and be sure to call it “{name}” by name. "
                     "Use only these facts and what you can see.")
        if remind:
            lines.append(f"Your previous answer did not say “{name}”. Name it explicitly.")
    return "\n".join(lines)


def gigachat_settings(env: dict[str, str]) -> dict:
    """Client settings from GIGACHAT_* variables. Missing credentials are a clear error."""
    credentials = env.get("GIGACHAT_CREDENTIALS")
    if not credentials:
        raise CultvlmError("GigaChat needs GIGACHAT_CREDENTIALS (the base64 authorization key) in the "
                           "environment or in ./.env; or caption without an API: --provider offline")
    credentials = credentials.strip()  # a key pasted with its newline
    if credentials.startswith("Basic "):
        raise CultvlmError("GIGACHAT_CREDENTIALS: give the authorization key without the 'Basic ' in front of it")
    if not re.fullmatch(r"[A-Za-z0-9+/=_-]+", credentials):
        raise CultvlmError("GIGACHAT_CREDENTIALS: not a base64 authorization key (it holds characters other "
                           "than A-Z, a-z, 0-9, +, /, =); copy the key from the GigaChat project page as it is")
    settings = {"credentials": credentials, "scope": env.get("GIGACHAT_SCOPE") or "GIGACHAT_API_PERS",
                "model": env.get("GIGACHAT_MODEL") or DEFAULT_GIGACHAT_MODEL}
    for key in ("base_url", "auth_url"):
        if env.get(f"GIGACHAT_{key.upper()}"):
            settings[key] = env[f"GIGACHAT_{key.upper()}"]
    bundle = env.get("GIGACHAT_CA_BUNDLE_FILE")
    if bundle:  # the Russian Trusted Root CA, which GigaChat's certificate chains to
        if not Path(bundle).expanduser().is_file():
            raise CultvlmError(f"GIGACHAT_CA_BUNDLE_FILE: {bundle}: no such file")
        settings["ca_bundle_file"] = str(Path(bundle).expanduser())
    verify = env.get("GIGACHAT_VERIFY_SSL_CERTS")
    if verify:
        if verify.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise CultvlmError(f"GIGACHAT_VERIFY_SSL_CERTS: expected true or false, got {verify!r}")
        settings["verify_ssl_certs"] = verify.strip().lower() in ("1", "true", "yes", "on")
    return settings


def environment() -> dict[str, str]:
    """os.environ over ./.env: a variable already set is never overridden by the file."""
    from dotenv import dotenv_values

    from_file = {k: v for k, v in dotenv_values(Path.cwd() / ".env").items() if v is not None}
    return {**from_file, **os.environ}


def secret_spellings(secret: str) -> set[str]:
    """Every way a secret can come back in an error body: as is, JSON-escaped (`\\/` for `/`),
    URL-encoded, and -- for the base64 authorization key -- decoded, with its client id and
    client secret on their own."""
    import base64
    import binascii
    from urllib.parse import quote, quote_plus

    found = {secret, secret.replace("/", "\\/"), json.dumps(secret)[1:-1], quote(secret, safe=""), quote_plus(secret)}
    try:
        decoded = base64.b64decode(secret, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = None
    if decoded:
        found |= {decoded, *(part for part in decoded.split(":") if len(part) >= 8)}
    return {spelling for spelling in found if len(spelling) >= 8}  # never mask ordinary short words


def redact(text: str, secrets) -> str:
    """`text` with every spelling of every secret masked, longest first (a part inside a whole)."""
    spellings = {spelling for secret in secrets if secret for spelling in secret_spellings(secret)}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, "***")
    return text


class GigaChatCaptioner:
    provider = "gigachat"

    def __init__(self, env: dict[str, str], timeout: float = 60.0, retries: int = 4, retry_delay: float = 2.0):
        from gigachat import GigaChat

        settings = gigachat_settings(env)
        self.model = settings["model"]
        self._secrets = [settings["credentials"]]
        self.retries, self.retry_delay = retries, retry_delay
        # Retries are ours (bounded, with the 401 case stopping at once), not the SDK's.
        self.client = GigaChat(**settings, timeout=timeout, max_retries=0)
        try:
            self._call("sign-in", self.client.get_token)  # a bad credential stops before any work
        except BaseException:
            self.client.close()
            raise

    def close(self) -> None:
        self.client.close()

    def _redact(self, text: str) -> str:
        return redact(text, [*self._secrets, self.client.token])

    def _call(self, what: str, fn, *args):
        """fn(*args) with bounded retries on 429, 5xx, timeouts and dropped connections."""
        from gigachat.exceptions import (AuthenticationError, ForbiddenError, RateLimitError, ResponseError,
                                         ServerError)
        from pydantic import ValidationError

        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except (AuthenticationError, ForbiddenError) as e:
                raise CultvlmError(
                    f"GigaChat refused the credentials (HTTP {e.status_code} on {what}): check "
                    "GIGACHAT_CREDENTIALS and GIGACHAT_SCOPE, or caption without an API: --provider offline"
                ) from None
            except RateLimitError as e:
                problem, wait = "HTTP 429", e.retry_after or self.retry_delay * 2 ** attempt
            except ServerError as e:
                problem, wait = f"HTTP {e.status_code}", self.retry_delay * 2 ** attempt
            except httpx.TransportError as e:  # timeouts among them
                if "CERTIFICATE_VERIFY_FAILED" in str(e):  # retrying will not help
                    raise CultvlmError(
                        f"GigaChat {what}: the server's certificate is not trusted here (GigaChat's chains to the "
                        "Russian Trusted Root CA): set GIGACHAT_CA_BUNDLE_FILE to that CA's .crt file, in the "
                        "environment or ./.env") from None
                problem, wait = type(e).__name__, self.retry_delay * 2 ** attempt
            except ResponseError as e:  # 400, 404, 413, 422: retrying will not help
                body = self._redact((e.content or b"").decode("utf-8", "replace"))[:200]
                raise CultvlmError(f"GigaChat {what}: HTTP {e.status_code} {' '.join(body.split())}") from None
            except (ValidationError, ValueError) as e:
                raise CultvlmError(f"GigaChat {what}: unexpected answer ({type(e).__name__})") from None
            if attempt == self.retries:
                tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
                raise CultvlmError(f"GigaChat {what}: gave up after {tries} (last: {problem})")
            wait = min(wait, MAX_WAIT)
            click.echo(f"note: GigaChat {what}: {problem}; retrying in {wait:.1f}s", err=True)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def describe(self, item: Item, image, lang: str) -> tuple[str, str | None, str | None]:
        image = image.copy()
        image.thumbnail((UPLOAD_MAX_SIDE, UPLOAD_MAX_SIDE))
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=90)
        # Named by hash: the local path says nothing the API needs to know.
        upload = (f"{item.sha256[:16]}.jpg", jpeg.getvalue(), "image/jpeg")
        file_id = self._call(f"upload of {item.image}", self.client.upload_file, upload).id_
        try:
            for attempt in range(2):  # a caption that does not name the entity gets one more try
                answer = self._call(f"caption of {item.image}", self.client.chat, {
                    "model": self.model,
                    "messages": [{"role": "system", "content": SYSTEM[lang]},
                                 {"role": "user", "content": grounding_prompt(item.entity, lang, attempt > 0),
                                  "attachments": [file_id]}]})
                caption = " ".join((answer.choices[0].message.content if answer.choices else "").split())
                if names_entity(caption, item.entity):
                    return caption, answer.model, None
            return caption, answer.model, NOT_NAMED
        finally:
            try:  # uploads count against the account's storage; losing one is harmless
                self.client.delete_file(file_id)
            except Exception:
                pass


# --- the verb ---

def caption_images(images_root: str | Path, catalog_path: str | Path, captions_path: str | Path,
                   provider: str = "gigachat", lang: str = "ru", limit: int | None = None,
                   timeout: float = 60.0, retries: int = 4, retry_delay: float = 2.0) -> Counter:
    """Caption what has no caption yet; returns counts (new, flagged, had, unreadable)."""
    if lang not in LANGS:
        raise CultvlmError(f"--lang must be one of {', '.join(LANGS)}, got {lang!r}")
    images_root, captions_path = Path(images_root), Path(captions_path)
    catalog = load_catalog(catalog_path)
    done = {(r.get("sha256"), r.get("lang")) for r in read_jsonl(captions_path)}
    counts: Counter = Counter()
    todo = []
    for item in find_images(images_root, catalog):
        if (item.sha256, lang) in done:
            counts["had"] += 1
        else:
            done.add((item.sha256, lang))  # the same picture twice is described once
            todo.append(item)
    todo = todo[:limit] if limit else todo
    if not todo:
        return counts
    captions_path.parent.mkdir(parents=True, exist_ok=True)
    captioner = (OfflineCaptioner() if provider == "offline" else
                 GigaChatCaptioner(environment(), timeout=timeout, retries=retries, retry_delay=retry_delay))
    try:
        for number, item in enumerate(todo, 1):
            if not utf8_name(item.image):  # could not be written to the captions file
                click.echo(f"note: skipped {printable(item.path)}: {NOT_UTF8}", err=True)
                counts["unreadable"] += 1
                continue
            try:
                image = load_image(item.path)
            except CultvlmError as e:
                click.echo(f"note: skipped {e.message}", err=True)
                counts["unreadable"] += 1
                continue
            caption, model, reason = captioner.describe(item, image, lang)
            record = {"sha256": item.sha256, "entity": item.entity.id, "image": item.image,
                      "provider": captioner.provider, "model": model, "lang": lang, "caption": caption,
                      "flagged": reason is not None}
            if reason:
                record["reason"] = reason
            append_jsonl(captions_path, record)
            counts["new"] += 1
            counts["flagged"] += reason is not None
            mark = f"  [flagged: {reason}]" if reason else ""
            click.echo(f"[{number}/{len(todo)}] {item.image}: {caption[:100]}{mark}", err=True)
    finally:
        captioner.close()
    return counts


@click.command("caption")
@click.option("--provider", type=click.Choice(["gigachat", "offline"]), default="gigachat", show_default=True,
              help="gigachat: GigaChat API (GIGACHAT_CREDENTIALS); offline: templates from the catalog")
@click.option("--images", default="data/images", show_default=True, type=click.Path(file_okay=False),
              help="folder of <entity id>/ image folders")
@click.option("--catalog", default="data/entities.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--captions", default=None, type=click.Path(dir_okay=False),
              help="JSON-lines file the captions are appended to [default: captions.jsonl beside the images "
                   "folder, where `data build` looks]")
@click.option("--lang", type=click.Choice(list(LANGS)), default="ru", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="caption at most this many images")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="seconds to wait for one GigaChat answer")
@click.option("--retries", type=click.IntRange(min=0), default=4, show_default=True,
              help="retries of one GigaChat request on 429, 5xx, timeouts")
@click.option("--retry-delay", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="first wait before a retry, doubled each time (a 429's Retry-After wins)")
def command(provider, images, catalog, captions, lang, limit, timeout, retries, retry_delay):
    """Describe every image that has no caption yet, grounded in the entity catalog."""
    if captions is None:
        captions = str(Path(os.path.normpath(Path(images) / "..")) / "captions.jsonl")
    counts = caption_images(images, catalog, captions, provider=provider, lang=lang, limit=limit,
                            timeout=timeout, retries=retries, retry_delay=retry_delay)
    summary = f"{counts['new']} new caption(s) in {captions}"
    if counts["flagged"]:
        summary += f", {counts['flagged']} flagged (not naming the entity)"
    summary += f"; {counts['had']} image(s) already captioned"
    if counts["unreadable"]:
        summary += f"; {counts['unreadable']} unreadable image(s) skipped"
    click.echo(summary)
