"""`cultvlm data collect ID --source commons`: freely licensed images of one entity from
Wikimedia Commons, with their authors and licenses.

Each image lands in `<images-root>/<ID>/commons_<pageid>.<ext>` and is recorded in that
folder's `sources.jsonl` only once it is fully on disk; `CREDITS.md` is rebuilt from the records.
So a run can stop anywhere: the next one skips what is recorded and fetches the rest.

Commons asks API clients for a descriptive User-Agent, serial requests, and backing off when
told to (429/503 with Retry-After, `maxlag`): all of that is done here.
"""

from __future__ import annotations

import difflib
import email.utils
import hashlib
import html
import os
import re
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import click
import httpx

from ..errors import CultvlmError
from ..files import append_jsonl, read_jsonl
from ..images import load_image
from .catalog import Entity, load_catalog

DEFAULT_ENDPOINT = "https://commons.wikimedia.org/w/api.php"
IMAGE_MIMES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
INFO_BATCH = 20  # files per imageinfo call (the API allows 50; smaller gives progress sooner)
MAX_PAGES = 10  # result pages per search or category, 50 files each
MAX_WAIT = 120.0  # seconds: the longest Retry-After we honour before giving up on a request
MAXLAG = 5  # seconds of database replication lag we accept (Wikimedia's advice for bots)


def user_agent() -> str:
    """Wikimedia's policy: name the tool, its version and a way to reach whoever runs it."""
    try:
        from importlib.metadata import version

        ours = version("cultvlm")
    except Exception:  # running from a source tree that was never installed
        ours = "0"
    contact = os.environ.get("CULTVLM_CONTACT") or "no contact given; set CULTVLM_CONTACT"
    return f"cultvlm/{ours} (regional-culture VLM dataset builder; {contact}) httpx/{httpx.__version__}"


def find_entity(catalog: dict[str, Entity], entity_id: str, catalog_path) -> Entity:
    if entity_id in catalog:
        return catalog[entity_id]
    close = difflib.get_close_matches(entity_id, list(catalog), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"known ids: {', '.join(list(catalog)[:10])}"
    raise CultvlmError(f"{catalog_path}: no entity {entity_id!r}; {hint}")


# --- licenses and metadata ---

def plain_text(value) -> str:
    """Commons' extmetadata values are HTML snippets: keep the words."""
    text = re.sub(r"<[^>]*>", " ", str(value or ""))
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def is_free_license(code: str, short_name: str, non_free: str = "") -> bool:
    """CC0, public domain, CC BY and CC BY-SA only. NC/ND, fair use and anything unrecognised
    (GFDL-only, 'all rights reserved', no license at all) are not taken."""
    if plain_text(non_free).lower() in ("true", "1", "yes"):
        return False
    words = set()
    phrases = []
    for text in (code, short_name):
        text = plain_text(text).lower()
        phrases.append(text)
        words.update(w for w in re.split(r"[\s\-_/]+", text) if w)
    if words & {"nc", "nd"}:
        return False
    for text in phrases:
        first = re.split(r"[\s\-_/]+", text)
        if first[0] in ("cc0", "pd") or text.startswith(("public domain", "cc zero", "cc-zero")):
            return True
        if first[:2] == ["cc", "by"]:
            return True
    return False


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the other form HTTP allows: a date
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Commons:
    """The MediaWiki API and its file server, one request at a time, politely."""

    def __init__(self, endpoint: str, delay: float = 1.0, retries: int = 5, timeout: float = 30.0):
        self.endpoint = endpoint
        self.delay = delay
        self.retries = retries
        self.http = httpx.Client(headers={"User-Agent": user_agent()}, timeout=timeout,
                                 follow_redirects=True)
        self._last_request = float("-inf")

    def close(self) -> None:
        self.http.close()

    def _backoff(self, attempt: int) -> float:
        return min(MAX_WAIT, max(self.delay, 0.01) * 2 ** (attempt + 1))

    def _get(self, url: str, params: dict | None = None, api: bool = False):
        """GET with a minimum gap between requests and bounded retries on 429, 5xx, timeouts
        and dropped connections. API answers come back as parsed JSON, files as responses."""
        for attempt in range(self.retries + 1):
            time.sleep(max(0.0, self._last_request + self.delay - time.monotonic()))
            try:
                response = self.http.get(url, params=params)
            except httpx.TransportError as e:  # timeouts, refused or reset connections, cut bodies
                problem, wait = f"{type(e).__name__}", self._backoff(attempt)
            else:
                status = response.status_code
                if status == 429 or status >= 500:
                    problem, wait = f"HTTP {status}", _retry_after(response)
                    wait = self._backoff(attempt) if wait is None else wait
                elif status == 403 and not os.environ.get("CULTVLM_CONTACT"):
                    # Wikimedia refuses clients whose User-Agent names no way to reach them.
                    raise CultvlmError(f"{url}: HTTP 403 {response.reason_phrase}: Wikimedia asks for a User-Agent "
                                       "with a contact; set CULTVLM_CONTACT (an e-mail or a URL) and run again")
                elif status >= 400:
                    raise CultvlmError(f"{url}: HTTP {status} {response.reason_phrase}")
                elif not api:
                    return response
                else:
                    data = self._json(response)
                    error = data.get("error") or {}
                    if error.get("code") != "maxlag":
                        if error:
                            raise CultvlmError(f"{self.endpoint}: API error {error.get('code')}: "
                                               f"{plain_text(error.get('info'))}")
                        return data
                    problem, wait = "database lag (maxlag)", _retry_after(response) or float(MAXLAG)
            finally:
                self._last_request = time.monotonic()
            if attempt == self.retries:
                tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
                raise CultvlmError(f"{url}: gave up after {tries} (last: {problem})")
            if wait > MAX_WAIT:
                raise CultvlmError(f"{url}: {problem}, and asked to wait {wait:.0f}s; try again later")
            click.echo(f"note: {problem} from {urlsplit(url).netloc}; retrying in {wait:.1f}s", err=True)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _json(self, response: httpx.Response) -> dict:
        kind = response.headers.get("content-type", "")
        looks_html = "html" in kind or response.content.lstrip()[:1] == b"<"
        if looks_html:
            raise CultvlmError(f"{self.endpoint}: answered with an HTML page, not MediaWiki JSON "
                               "(a captive portal, proxy or error page?); check the network or --endpoint")
        try:
            data = response.json()
        except ValueError:
            raise CultvlmError(f"{self.endpoint}: answer is not JSON ({kind or 'no content type'})") from None
        if not isinstance(data, dict):
            raise CultvlmError(f"{self.endpoint}: answer is not a MediaWiki API object")
        return data

    def query(self, **params) -> dict:
        return self._get(self.endpoint, {"action": "query", "format": "json", "formatversion": 2,
                                         "maxlag": MAXLAG, **params}, api=True)

    def page_ids(self, list_name: str, **params):
        """Page ids from a `list=` query, following `continue` for up to MAX_PAGES pages."""
        cont: dict = {}
        for _ in range(MAX_PAGES):
            data = self.query(**{"list": list_name, **params, **cont})
            for item in (data.get("query") or {}).get(list_name) or []:
                if isinstance(item.get("pageid"), int):
                    yield item["pageid"]
            cont = data.get("continue") or {}
            if not cont:
                return

    def image_info(self, page_ids: list[int], max_width: int) -> list[dict]:
        params = {"prop": "imageinfo", "pageids": "|".join(map(str, page_ids)),
                  "iiprop": "url|extmetadata|mime|size",
                  "iiextmetadatafilter": "Artist|Credit|LicenseShortName|License|LicenseUrl|NonFree"}
        if max_width:
            params["iiurlwidth"] = max_width
        pages = (self.query(**params).get("query") or {}).get("pages") or []
        return list(pages.values()) if isinstance(pages, dict) else pages  # formatversion 1 or 2

    def download(self, url: str) -> tuple[bytes, str]:
        """The file's bytes and its MIME type as served."""
        response = self._get(url)
        mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if "html" in mime:
            raise CultvlmError(f"{url}: answered with an HTML page, not an image "
                               "(a captive portal or error page?)")
        return response.content, mime


def candidate_pages(commons: Commons, entity: Entity):
    """Page ids of files that may show the entity, best first: its Commons category (curated by
    people), then a file search for each of its names."""
    if entity.commons_category:
        category = entity.commons_category
        if not category.startswith("Category:"):
            category = f"Category:{category}"
        yield from commons.page_ids("categorymembers", cmtitle=category, cmtype="file", cmlimit=50)
    for name in entity.all_names():
        phrase = name.replace('"', " ")
        yield from commons.page_ids("search", srsearch=f'"{phrase}" filetype:bitmap', srnamespace=6,
                                    srlimit=50)


def pageid_of(record: dict) -> int | None:
    if isinstance(record.get("pageid"), int):
        return record["pageid"]
    match = re.fullmatch(r"commons_(\d+)\.\w+", str(record.get("file", "")))
    return int(match.group(1)) if match else None


def _md(text) -> str:
    return str(text or "").replace("[", "\\[").replace("]", "\\]").replace("\n", " ")


def write_credits(folder: Path, entity_id: str, records: list[dict]) -> None:
    """CREDITS.md, rebuilt from sources.jsonl (atomically), one line per image."""
    lines = [f"# Image credits: {entity_id}", "",
             "Each image is used under the license named with it; follow the links for the authors' "
             "pages and the full terms. Generated from sources.jsonl: do not edit by hand.", ""]
    for r in records:
        title = _md(r.get("title") or r.get("file"))
        source = f"[{title}]({r['description_url']})" if r.get("description_url") else title
        license_name = _md(r.get("license") or "license unknown")
        if r.get("license_url"):
            license_name = f"[{license_name}]({r['license_url']})"
        where = " (Wikimedia Commons)" if r.get("source") == "commons" else ""
        lines.append(f"- `{r.get('file')}`: {source}{where}, by {_md(r.get('author') or 'unknown author')}, "
                     f"{license_name}")
    tmp = folder / ".CREDITS.md.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "CREDITS.md")


def _store(folder: Path, name: str, data: bytes) -> str:
    """Write under a temporary name, check it decodes, then rename: the final name only ever
    holds a whole image. Returns its sha256."""
    tmp = folder / f".{name}.part"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        load_image(tmp)  # a cut or corrupt file fails here, naming it
    except CultvlmError:
        tmp.unlink()
        raise
    os.replace(tmp, folder / name)
    return hashlib.sha256(data).hexdigest()


def describe_file(page: dict) -> dict | str:
    """What we would record for one imageinfo page, or why the file is skipped."""
    info = (page.get("imageinfo") or [None])[0]
    if page.get("missing") or not info or not info.get("url") or "pageid" not in page:
        return "no file information"
    if info.get("mime") not in IMAGE_MIMES:
        return "not a JPEG/PNG/WebP/GIF image"
    meta = info.get("extmetadata") or {}

    def value(key):
        return (meta.get(key) or {}).get("value") or ""

    if not is_free_license(value("License"), value("LicenseShortName"), value("NonFree")):
        return "license not free (NC/ND, fair use or unknown)"
    return {"title": page.get("title"), "source_url": info.get("thumburl") or info["url"],
            "description_url": info.get("descriptionurl"),
            "author": plain_text(value("Artist")) or plain_text(value("Credit")) or None,
            "license": plain_text(value("LicenseShortName")) or plain_text(value("License")),
            "license_url": plain_text(value("LicenseUrl")) or None,
            "source": "commons", "pageid": page["pageid"], "mime": info["mime"]}


def collect(entity_id: str, catalog_path: str | Path, images_root: str | Path, limit: int,
            endpoint: str = DEFAULT_ENDPOINT, delay: float = 1.0, retries: int = 5,
            timeout: float = 30.0, max_width: int = 1280) -> tuple[int, int, Counter]:
    """Download free images until the entity has `limit` of them from Commons.
    Returns (new images, Commons images now held, skipped files counted by reason)."""
    entity = find_entity(load_catalog(catalog_path), entity_id, catalog_path)
    folder = Path(images_root) / entity.id
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".commons_*.part"):  # left by an interrupted run, never recorded
        stale.unlink()
    sources = folder / "sources.jsonl"
    records = read_jsonl(sources)
    held = {pageid_of(r) for r in records if r.get("source") == "commons"} - {None}
    skipped: Counter = Counter()
    new = 0

    def take(page: dict) -> None:
        nonlocal new
        record = describe_file(page)
        if isinstance(record, str):
            skipped[record] += 1
            return
        original_mime = record.pop("mime")
        data, mime = commons.download(record["source_url"])
        # A thumbnail may come in another format than the original: name it by what came.
        name = f"commons_{record['pageid']}.{IMAGE_MIMES.get(mime) or IMAGE_MIMES[original_mime]}"
        try:
            sha256 = _store(folder, name, data)
        except CultvlmError as e:
            click.echo(f"note: skipped {record['title']}: {e.message}", err=True)
            skipped["download did not decode"] += 1
            return
        record = {"file": name, **record, "sha256": sha256}
        append_jsonl(sources, record)  # only now, with the whole file in place, is it recorded
        records.append(record)
        write_credits(folder, entity.id, records)
        held.add(record["pageid"])
        new += 1
        click.echo(f"{name}: {record['title']} ({record['license']})", err=True)

    def take_batch(page_ids: list[int]) -> None:
        order = {page_id: i for i, page_id in enumerate(page_ids)}  # the API sorts its own way
        pages = sorted(commons.image_info(page_ids, max_width), key=lambda p: order.get(p.get("pageid"), 0))
        for page in pages:
            if len(held) < limit:
                take(page)

    if len(held) >= limit:
        return new, len(held), skipped
    commons = Commons(endpoint, delay=delay, retries=retries, timeout=timeout)
    try:
        seen, batch = set(held), []
        for page_id in candidate_pages(commons, entity):
            if page_id not in seen:
                seen.add(page_id)
                batch.append(page_id)
            if len(batch) == INFO_BATCH:
                take_batch(batch)
                batch = []
                if len(held) >= limit:
                    break
        if batch and len(held) < limit:
            take_batch(batch)
    finally:
        commons.close()
    return new, len(held), skipped


@click.command("collect")
@click.argument("entity_id")
@click.option("--source", type=click.Choice(["commons"]), default="commons", show_default=True,
              help="where to look for images")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="stop once the entity has this many images from the source")
@click.option("--catalog", default="data/entities.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--images-root", default="data/images", show_default=True, type=click.Path(file_okay=False))
@click.option("--endpoint", envvar="CULTVLM_COMMONS_ENDPOINT", default=DEFAULT_ENDPOINT, show_default=True,
              help="MediaWiki API URL (env CULTVLM_COMMONS_ENDPOINT)")
@click.option("--delay", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="minimum seconds between requests; retries wait 2x, 4x, 8x... this")
@click.option("--retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="retries of one request on 429, 5xx, timeouts")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="seconds to wait for one answer")
@click.option("--max-width", type=click.IntRange(min=0), default=1280, show_default=True,
              help="download a thumbnail at most this wide (0: the original file)")
def command(entity_id, source, limit, catalog, images_root, endpoint, delay, retries, timeout, max_width):
    """Download freely licensed images of ENTITY_ID from Wikimedia Commons, with credits."""
    new, held, skipped = collect(entity_id, catalog, images_root, limit, endpoint=endpoint, delay=delay,
                                 retries=retries, timeout=timeout, max_width=max_width)
    folder = Path(images_root) / entity_id
    summary = f"{entity_id}: {new} new image(s), {held} from Commons in {folder}"
    if skipped:
        summary += "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    if held < limit:
        summary += f"; found fewer than --limit {limit}"
    click.echo(summary)
