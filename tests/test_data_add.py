"""`cultvlm data add`: copy decodable pictures without losing anything, update the catalog."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mlx_cultvlm.data.add import command
from mlx_cultvlm.data.catalog import load_catalog
from test_data_check import picture, save


def run(*args: str):
    return CliRunner().invoke(command, list(args))


def source_folder(root: Path) -> Path:
    save(picture(1), root / "one.png")
    save(picture(2), root / "two.jpg", quality=90)
    save(picture(3), root / "nested" / "three.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"")
    (root / ".hidden.png").write_bytes(b"")  # hidden files are not looked at
    return root


def test_add_new_entity_copies_only_images(tmp_path, monkeypatch):
    monkeypatch.delenv("GIGACHAT_CREDENTIALS", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./.env with credentials either
    src = source_folder(tmp_path / "src")
    catalog, images = tmp_path / "data" / "entities.json", tmp_path / "data" / "images"
    result = run("gena", "--name", "Крокодил Гена", "--name", "Гена", "--name-en", "Gena the Crocodile",
                 "--images", str(src), "--catalog", str(catalog), "--images-root", str(images))
    assert result.exit_code == 0, result.output
    dest = images / "gena"
    assert sorted(p.name for p in dest.iterdir()) == ["one.png", "three.png", "two.jpg"]
    assert (dest / "two.jpg").read_bytes() == (src / "two.jpg").read_bytes()
    assert "copied 3 image(s)" in result.output
    assert "skipped 2 file(s)" in result.output
    assert f"{src / 'broken.jpg'}: empty file (0 bytes)" in result.output
    assert f"{src / 'notes.txt'}: not an image Pillow can read" in result.output
    for step in ("cultvlm data check", "cultvlm data caption --provider offline", "cultvlm data build"):
        assert step in result.output
    entity = load_catalog(catalog)["gena"]
    assert entity.names == {"ru": ["Крокодил Гена", "Гена"], "en": ["Gena the Crocodile"]}
    assert entity.role == "target"


def test_add_again_skips_identical_and_renames_different(tmp_path):
    src = source_folder(tmp_path / "src")
    catalog, images = tmp_path / "entities.json", tmp_path / "images"
    args = ["--catalog", str(catalog), "--images-root", str(images)]
    assert run("gena", "--name", "Гена", "--images", str(src), *args).exit_code == 0
    before = {p.name: p.read_bytes() for p in (images / "gena").iterdir()}

    again = tmp_path / "again"
    save(picture(9), again / "one.png")                                       # same name, other picture
    (again / "copy_of_two.jpg").write_bytes((src / "two.jpg").read_bytes())   # same picture, other name
    (again / "three.png").write_bytes((src / "nested" / "three.png").read_bytes())
    result = run("gena", "--images", str(again), *args)
    assert result.exit_code == 0, result.output
    after = {p.name: p.read_bytes() for p in (images / "gena").iterdir()}
    assert {k: after[k] for k in before} == before  # nothing overwritten
    assert set(after) - set(before) == {"one-2.png"}
    assert after["one-2.png"] == (again / "one.png").read_bytes()
    assert "copied 1 image(s)" in result.output and "2 already there" in result.output


def test_existing_entry_keeps_facts_and_gains_aliases(tmp_path):
    catalog = tmp_path / "entities.json"
    catalog.write_text(json.dumps({"entities": [
        {"id": "gena", "names": {"ru": ["Крокодил Гена"], "en": []}, "facts": {"ru": ["Гена работает в зоопарке."]},
         "role": "target", "confusable_with": ["cheb"]},
        {"id": "cheb", "names": {"ru": ["Чебурашка"]}}]}, ensure_ascii=False), encoding="utf-8")
    result = run("gena", "--name", "Гена", "--name", "Крокодил Гена", "--name-en", "Gena", "--role", "control",
                 "--catalog", str(catalog), "--images-root", str(tmp_path / "images"))
    assert result.exit_code == 0, result.output
    entities = load_catalog(catalog)
    gena = entities["gena"]
    assert gena.names == {"ru": ["Крокодил Гена", "Гена"], "en": ["Gena"]}
    assert gena.facts["ru"] == ["Гена работает в зоопарке."]
    assert gena.confusable_with == ["cheb"] and gena.role == "control"
    assert list(entities) == ["gena", "cheb"]


def test_seed_plain_map_is_upgraded(tmp_path):
    catalog = tmp_path / "entities.json"
    catalog.write_text(json.dumps({"gena": "Крокодил Гена"}, ensure_ascii=False), encoding="utf-8")
    src = tmp_path / "src"
    save(picture(4), src / "k.png")
    result = run("kolobok", "--name", "Колобок", "--images", str(src), "--catalog", str(catalog),
                 "--images-root", str(tmp_path / "images"))
    assert result.exit_code == 0, result.output
    raw = json.loads(catalog.read_text(encoding="utf-8"))
    assert [e["id"] for e in raw["entities"]] == ["gena", "kolobok"]
    assert raw["entities"][0]["names"] == {"ru": ["Крокодил Гена"], "en": []}
    assert load_catalog(catalog)["kolobok"].name("ru") == "Колобок"


def test_sources_follow_renamed_files(tmp_path):
    images = tmp_path / "images"
    save(picture(5), images / "gena" / "a.png")
    src = tmp_path / "src"
    save(picture(6), src / "a.png")
    (src / "sources.jsonl").write_text(
        json.dumps({"file": "a.png", "source_url": "https://example.org/a", "author": "X", "license": "CC BY 4.0"})
        + "\n{torn\n", encoding="utf-8")
    result = run("gena", "--name", "Гена", "--images", str(src), "--catalog", str(tmp_path / "e.json"),
                 "--images-root", str(images))
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (images / "gena" / "sources.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"file": "a-2.png", "source_url": "https://example.org/a", "author": "X", "license": "CC BY 4.0"}]
    assert "sources.jsonl:2" in result.output  # the torn line is reported, not fatal


def test_errors_leave_everything_untouched(tmp_path):
    src = source_folder(tmp_path / "src")
    catalog, images = tmp_path / "entities.json", tmp_path / "images"
    # A new entity needs a name.
    result = run("gena", "--images", str(src), "--catalog", str(catalog), "--images-root", str(images))
    assert result.exit_code == 1 and "give it a name" in result.output
    assert not images.exists() and not catalog.exists()
    # A broken catalog is reported (file:line:column) before anything is copied.
    catalog.write_text('{"gena": "Гена",}', encoding="utf-8")
    result = run("gena", "--images", str(src), "--catalog", str(catalog), "--images-root", str(images))
    assert result.exit_code == 1 and f"{catalog}:1:" in result.output
    assert not images.exists() and catalog.read_text(encoding="utf-8") == '{"gena": "Гена",}'
    # An id that would leave the images folder.
    result = run("../evil", "--name", "x", "--images", str(src), "--catalog", str(tmp_path / "new.json"),
                 "--images-root", str(images))
    assert result.exit_code == 1 and "'id' must be" in result.output
    assert not images.exists()


def test_the_next_steps_caption_with_gigachat_only_when_it_has_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GIGACHAT_CREDENTIALS", raising=False)
    (tmp_path / ".env").write_text("GIGACHAT_CREDENTIALS=c2VjcmV0\n")
    result = run("gena", "--name", "Гена", "--catalog", str(tmp_path / "entities.json"),
                 "--images-root", str(tmp_path / "images"))
    assert result.exit_code == 0, result.output
    assert "cultvlm data caption --images" in result.output and "--provider offline" not in result.output
    assert "c2VjcmV0" not in result.output  # the secret is never printed
