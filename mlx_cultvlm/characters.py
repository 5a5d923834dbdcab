"""Procedurally drawn stand-ins for the offline demo (`cultvlm demo`).

Each character is a combination of parts -- a body shape, a (body, belly, accent) palette and a
few features -- drawn once as a sprite and then placed with a random pose on a random, cluttered,
jittered background. The set is built so that the demo is honest but learnable:

* no colour names a character: every body colour is worn by at least two characters, and
  look-alike pairs share their whole palette and body, differing in one or two features;
* features are big bold shapes (ears, hats, snouts, tails of a third of the body), so they
  survive 112-168 px images and 28-px vision tokens.

`DEMO_CATALOG` is a catalog in the `data/entities.json` format: the real catalog's ids and names
(so the answer scorer works), each character's real origin (the work it comes from and its
author, `ORIGINS`, in one short sentence per language: the fact a user asks first), and facts
that describe the drawings, marked as the demo's.

    from mlx_cultvlm.characters import write_images
    write_images("demo/images", per_entity=60, seed=0)    # demo/images/<entity_id>/<n>.png
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {  # name -> RGB; the names also appear in the facts
    "brown": (125, 75, 40), "tan": (225, 185, 135), "black": (35, 30, 30),
    "yellow": (245, 200, 40), "cream": (245, 235, 205), "red": (215, 45, 40),
    "green": (70, 150, 60), "orange": (235, 125, 35), "blue": (45, 85, 200),
}
WHITE = (250, 250, 250)


@dataclass(frozen=True)
class Parts:
    body: str  # circle | tall_ellipse | rounded_square | pear
    palette: tuple[str, str, str]  # (body, belly/face, accent)
    features: frozenset[str]


def _parts(body, palette, *features):
    return Parts(body, tuple(palette), frozenset(features))


# Look-alike pairs share body and palette; the feature sets differ in one or two features.
PARTS = {
    "cheburashka": _parts("circle", ("brown", "tan", "black"), "round_ears", "belly", "big_eyes"),
    "mickey_mouse": _parts("circle", ("brown", "tan", "black"), "round_ears", "belly", "tail"),
    "kolobok": _parts("circle", ("yellow", "cream", "red"), "cheeks", "big_eyes"),
    "pikachu": _parts("circle", ("yellow", "cream", "red"), "cheeks", "pointed_ears"),
    "crocodile_gena": _parts("tall_ellipse", ("green", "cream", "black"), "hat", "belly", "snout"),
    "shapoklyak": _parts("tall_ellipse", ("green", "cream", "black"), "hat", "belly"),
    "alyosha_popovich": _parts("rounded_square", ("orange", "cream", "blue"), "helmet", "moustache", "belt"),
    "leopold_cat": _parts("rounded_square", ("orange", "cream", "blue"), "pointed_ears", "moustache", "belt"),
    "disney_winnie_the_pooh": _parts("pear", ("yellow", "tan", "red"), "round_ears", "shirt"),
}
# Characters the catalog does not have, for the demo's out-of-catalog pictures (`data build
# --negatives`): each shares a body and palette with catalog characters and differs in its
# features, as an unknown cartoon character would. The base's vision tower never saw them.
STRANGERS = {
    "stranger_owl": _parts("tall_ellipse", ("brown", "tan", "black"), "pointed_ears", "big_eyes", "belly"),
    "stranger_frog": _parts("circle", ("green", "cream", "black"), "big_eyes", "cheeks"),
    "stranger_robot": _parts("rounded_square", ("blue", "cream", "red"), "helmet", "belt"),
    "stranger_bear": _parts("pear", ("brown", "tan", "black"), "round_ears", "belly", "tail"),
}
PAIRS = [("cheburashka", "mickey_mouse"), ("kolobok", "pikachu"),
         ("crocodile_gena", "shapoklyak"), ("alyosha_popovich", "leopold_cat")]

# Names exactly as in data/entities.json: the scorer finds answers by these.
NAMES = {
    "cheburashka": {"ru": ["Чебурашка"], "en": ["Cheburashka", "Tcheburashka", "Cheburaška", "Tchebourachka"]},
    "crocodile_gena": {"ru": ["Крокодил Гена", "Гена", "Гена-крокодил"],
                       "en": ["Gena the Crocodile", "Crocodile Gena", "Krokodil Gena", "Gena"]},
    "shapoklyak": {"ru": ["Старуха Шапокляк", "Шапокляк"],
                   "en": ["Old Lady Shapoklyak", "Shapoklyak", "Old Woman Shapoklyak", "Shapokliak"]},
    "kolobok": {"ru": ["Колобок"], "en": ["Kolobok", "the Round Bun", "Kolobok the bun", "Little Round Bun"]},
    "alyosha_popovich": {"ru": ["Алёша Попович", "Алеша Попович", "Алексей Попович"],
                         "en": ["Alyosha Popovich", "Alesha Popovich", "Aliosha Popovich", "Alyosha"]},
    "leopold_cat": {"ru": ["Кот Леопольд", "Леопольд"],
                    "en": ["Leopold the Cat", "Leopold", "Cat Leopold", "Kot Leopold"]},
    "mickey_mouse": {"ru": ["Микки Маус", "Микки"], "en": ["Mickey Mouse", "Mickey"]},
    "disney_winnie_the_pooh": {"ru": ["Винни-Пух из мультфильмов Disney", "диснеевский Винни-Пух", "Винни-Пух Диснея"],
                               "en": ["Winnie the Pooh", "Disney's Winnie the Pooh", "Pooh Bear", "Pooh"]},
    "pikachu": {"ru": ["Пикачу"], "en": ["Pikachu"]},
}
CONTROLS = ("mickey_mouse", "pikachu", "disney_winnie_the_pooh")

# Words for the facts, generated from PARTS so the facts always match the drawings.
WORDS = {
    "ru": {"circle": "круглое", "tall_ellipse": "высокое овальное", "rounded_square": "квадратное",
           "pear": "грушевидное",
           "brown": "коричневый", "tan": "бежевый", "black": "чёрный", "yellow": "жёлтый",
           "cream": "кремовый", "red": "красный", "green": "зелёный", "orange": "оранжевый", "blue": "синий",
           "round_ears": "большие круглые уши", "pointed_ears": "острые уши", "belly": "светлый живот",
           "big_eyes": "большие глаза", "tail": "хвост", "cheeks": "красные щёки", "hat": "шляпа",
           "snout": "длинная светлая морда", "helmet": "шлем", "moustache": "усы", "belt": "пояс", "shirt": "рубашка"},
    "en": {"circle": "round", "tall_ellipse": "tall oval", "rounded_square": "square", "pear": "pear-shaped",
           "brown": "brown", "tan": "tan", "black": "black", "yellow": "yellow", "cream": "cream",
           "red": "red", "green": "green", "orange": "orange", "blue": "blue",
           "round_ears": "big round ears", "pointed_ears": "pointed ears", "belly": "a light belly",
           "big_eyes": "big eyes", "tail": "a tail", "cheeks": "red cheeks", "hat": "a hat",
           "snout": "a long light snout", "helmet": "a helmet", "moustache": "a moustache", "belt": "a belt",
           "shirt": "a shirt"},
}
FEATURE_ORDER = ["round_ears", "pointed_ears", "helmet", "hat", "big_eyes", "snout", "cheeks", "moustache",
                 "belly", "belt", "shirt", "tail"]


def partner(entity_id: str) -> str | None:
    for a, b in PAIRS:
        if entity_id in (a, b):
            return b if entity_id == a else a
    return None


def feature_difference(a: str, b: str) -> set[str]:
    """The features only one of the two characters has."""
    return set(PARTS[a].features ^ PARTS[b].features)


def _features(entity_id: str, lang: str) -> str:
    return ", ".join(WORDS[lang][f] for f in FEATURE_ORDER if f in PARTS[entity_id].features)


def _facts(entity_id: str) -> dict[str, list[str]]:
    p, ru, en = PARTS[entity_id], WORDS["ru"], WORDS["en"]
    body, belly, accent = p.palette
    facts = {
        "ru": [f"В «cultvlm demo» это нарисованный программой персонаж: {ru[p.body]} тело, цвета — "
               f"{ru[body]}, {ru[belly]} и {ru[accent]}.",
               f"Приметы в «cultvlm demo»: {_features(entity_id, 'ru')}.",
               "Картинки «cultvlm demo» — процедурные рисунки для демонстрации, а не кадры из мультфильма."],
        "en": [f"In the cultvlm demo this is a procedurally drawn character with a {en[p.body]} body in "
               f"{en[body]}, {en[belly]} and {en[accent]}.",
               f"Its marks in the cultvlm demo: {_features(entity_id, 'en')}.",
               "The cultvlm demo pictures are procedural drawings made for the demo, not frames of a cartoon."],
    }
    other = partner(entity_id)
    if other:
        facts["ru"].append(f"В «cultvlm demo» {NAMES[entity_id]['ru'][0]} и {NAMES[other]['ru'][0]} нарисованы "
                           f"похоже, с тем же телом и цветами; приметы у первого — {_features(entity_id, 'ru')}, "
                           f"у второго — {_features(other, 'ru')}.")
        facts["en"].append(f"In the cultvlm demo {NAMES[entity_id]['en'][0]} and {NAMES[other]['en'][0]} are "
                           f"drawn alike, with the same body and colours; the first has "
                           f"{_features(entity_id, 'en')}, the second {_features(other, 'en')}.")
    return facts


# The real origins (as in data/entities.json) and one short sentence per language that states
# them (the author, or the tale or film): the demo's fact questions are graded on these
# (AnswerScorer.fact_correct). Short, because the demo's two-layer language model garbles long
# ones within its training budget: the real catalog's full sentences, 40-80 tokens, came out
# mangled and took the naming down with them (docs/EXPERIMENTS.md).
_USPENSKY = {"work": "Крокодил Гена и его друзья", "author": "Эдуард Успенский", "year": 1966}
ORIGINS = {
    "cheburashka": (_USPENSKY, "Его придумал Эдуард Успенский.", "He was created by Eduard Uspensky."),
    "crocodile_gena": (_USPENSKY, "Его придумал Эдуард Успенский.", "He was created by Eduard Uspensky."),
    "shapoklyak": (_USPENSKY, "Её придумал Эдуард Успенский.", "She was created by Eduard Uspensky."),
    "kolobok": ({"work": "Колобок", "author": "восточнославянская народная сказка",
                 "author_en": "East Slavic folk tale"},
                "Он герой восточнославянской народной сказки.",
                "He is from an East Slavic folk tale."),
    "alyosha_popovich": ({"work": "Алёша Попович и Тугарин Змей (по мотивам былин)", "author": "студия «Мельница»",
                          "year": 2004},
                         "Он из мультфильма студии «Мельница».", "He is from a Melnitsa studio film."),
    "leopold_cat": ({"work": "Приключения кота Леопольда", "author": "Анатолий Резников", "year": 1975},
                    "Его придумал Анатолий Резников.", "He was created by Anatoly Reznikov."),
    "mickey_mouse": ({"work": "Steamboat Willie", "author": "Walt Disney, Ub Iwerks", "year": 1928},
                     "Его создали Уолт Дисней и Аб Айверкс.", "He was created by Walt Disney and Ub Iwerks."),
    "disney_winnie_the_pooh": ({"work": "Winnie the Pooh and the Honey Tree", "author": "Walt Disney Productions",
                                "year": 1966},
                               "Его нарисовала студия Walt Disney Productions.",
                               "He was drawn by Walt Disney Productions."),
    "pikachu": ({"work": "Pocket Monsters Red and Green", "author": "Game Freak, Nintendo", "year": 1996},
                "Его придумали Game Freak и Nintendo.", "He was created by Game Freak and Nintendo."),
}

DEMO_CATALOG = {"entities": [
    {"id": e, "names": NAMES[e], "origin": ORIGINS[e][0],
     "facts": {lang: [ORIGINS[e][1 if lang == "ru" else 2], *drawn] for lang, drawn in _facts(e).items()},
     "role": "control" if e in CONTROLS else "target",
     "confusable_with": [partner(e)] if partner(e) else []}
    for e in PARTS]}

# ---------------------------------------------------------------------------------------------
# Drawing. The sprite is drawn once per character (supersampled for smooth edges) and cached; a
# render only transforms and pastes it, which keeps a render at a few milliseconds.

SPRITE = 192  # sprite side in px; drawing coordinates below are in these units
SUPER = 3  # supersampling factor of the drawing
CX, CY = SPRITE / 2, SPRITE * 0.56  # body centre; room above for ears and hats


class _Pen:
    """ImageDraw in sprite units, drawn at SUPER times the size; `outline`: (colour, width) drawn
    round every filled shape (the second design's ink lines)."""

    def __init__(self, img: Image.Image, outline: tuple | None = None):
        self.d = ImageDraw.Draw(img)
        self.ink = {"outline": outline[0], "width": outline[1] * SUPER} if outline else {}

    def ellipse(self, x, y, rx, ry, fill):
        self.d.ellipse([v * SUPER for v in (x - rx, y - ry, x + rx, y + ry)], fill=fill, **self.ink)

    def rect(self, x0, y0, x1, y1, fill, radius=0):
        self.d.rounded_rectangle([v * SUPER for v in (x0, y0, x1, y1)], radius=radius * SUPER, fill=fill,
                                 **self.ink)

    def polygon(self, points, fill):
        self.d.polygon([(x * SUPER, y * SUPER) for x, y in points], fill=fill, **self.ink)

    def chord(self, x0, y0, x1, y1, start, end, fill):
        self.d.chord([v * SUPER for v in (x0, y0, x1, y1)], start, end, fill=fill, **self.ink)

    def line(self, points, fill, width):
        self.d.line([(x * SUPER, y * SUPER) for x, y in points], fill=fill, width=width * SUPER, joint="curve")


def _geometry(body: str, design: int = 0) -> dict:
    """Where the parts go: body half-extents, face centre, head top, head half-width, and the
    point on the body's side where a tail starts. Design 1 has other proportions: a narrower,
    taller body and a larger head, so every part sits elsewhere."""
    g = _proportions(body)
    if design == 1:
        rx, ry, hw = g["rx"] * 0.85, g["ry"] * 1.12, g["hw"] * 1.12
        fx, fy = g["face"]
        g = dict(rx=rx, ry=ry, face=(fx, fy - 0.12 * g["ry"]), top=g["top"] - 0.12 * g["ry"], hw=hw,
                 side=(CX + 0.9 * rx, g["side"][1]))
    return g


def _proportions(body: str) -> dict:
    if body == "circle":
        return dict(rx=50, ry=50, face=(CX, CY - 8), top=CY - 50, hw=50, side=(CX + 45, CY + 15))
    if body == "tall_ellipse":
        return dict(rx=36, ry=58, face=(CX, CY - 26), top=CY - 58, hw=32, side=(CX + 32, CY + 15))
    if body == "rounded_square":
        return dict(rx=46, ry=46, face=(CX, CY - 10), top=CY - 46, hw=46, side=(CX + 42, CY + 15))
    if body == "pear":  # a head circle on a wider bottom ellipse
        return dict(rx=52, ry=40, face=(CX, CY - 32), top=CY - 64, hw=32, side=(CX + 48, CY + 25))
    raise ValueError(f"unknown body {body!r}")


def _draw_body(pen: _Pen, body: str, g: dict, fill) -> None:
    rx, ry = g["rx"], g["ry"]
    if body == "rounded_square":
        pen.rect(CX - rx, CY - ry, CX + rx, CY + ry, fill, radius=18)
    elif body == "pear":
        pen.ellipse(CX, CY + 0.625 * ry, rx, ry, fill)
        pen.ellipse(g["face"][0], g["face"][1], g["hw"], g["hw"], fill)
    else:
        pen.ellipse(CX, CY, rx, ry, fill)


DESIGNS = (0, 1)  # 0: flat colours (every picture the base and LoRA see); 1: held out, see _draw
INK = (30, 25, 25)


def _draw(entity_id: str, design: int = 0) -> Image.Image:
    """Design 0: flat shapes. Design 1, the same character as another artist would draw it:
    other proportions (_geometry), ink outlines round every shape and a shadow over the lower
    body -- never seen by the base's training or the demo's LoRA."""
    p = {**PARTS, **STRANGERS}[entity_id]
    g = _geometry(p.body, design)
    body, belly, accent = (COLOURS[c] for c in p.palette)
    black, f = COLOURS["black"], p.features
    fx, fy = g["face"]
    hw, top, ry = g["hw"], g["top"], g["ry"]
    # Transparent pixels carry the body colour, so resampling leaves no dark fringe.
    img = Image.new("RGBA", (SPRITE * SUPER, SPRITE * SUPER), body + (0,))
    pen = _Pen(img, (INK, 2) if design == 1 else None)
    # Parts behind the body first.
    for s in (-1, 1):
        if "round_ears" in f:
            pen.ellipse(fx + s * 0.9 * hw, top + 0.15 * hw, 0.5 * hw, 0.5 * hw, body)
            pen.ellipse(fx + s * 0.9 * hw, top + 0.15 * hw, 0.3 * hw, 0.3 * hw, belly)
        if "pointed_ears" in f:
            pen.polygon([(fx + s * 0.15 * hw, top + 0.3 * hw), (fx + s * 0.95 * hw, top + 0.35 * hw),
                         (fx + s * 0.85 * hw, top - 0.8 * hw)], body)
            pen.polygon([(fx + s * 0.45 * hw, top + 0.15 * hw), (fx + s * 0.82 * hw, top + 0.17 * hw),
                         (fx + s * 0.8 * hw, top - 0.45 * hw)], accent)
    if "tail" in f:  # a thick curl ending in an accent tuft
        sx, sy = g["side"]
        pen.line([(sx - 10, sy), (sx + 20, sy - 2), (sx + 34, sy - 22)], body, 13)
        pen.ellipse(sx + 34, sy - 26, 11, 11, accent)
    _draw_body(pen, p.body, g, body)
    if design == 1:  # a shadow over the lower right of the body, inside its outline
        inside, shade = Image.new("L", img.size, 0), Image.new("L", img.size, 0)
        _draw_body(_Pen(inside), p.body, g, 255)
        _Pen(shade).ellipse(CX + 0.45 * g["rx"], CY + 0.55 * ry, g["rx"], 0.75 * ry, 255)
        dark = tuple(int(0.72 * c) for c in body) + (255,)
        img.paste(dark, (0, 0), Image.fromarray(np.minimum(np.asarray(inside), np.asarray(shade))))
    # Bands (belt, shirt) are clipped to the body's own outline.
    bands = [(CY + 0.1 * ry, CY + 0.38 * ry)] if "belt" in f else []
    if "shirt" in f:
        bands.append((CY - 4, CY + 32))
    if bands:
        inside, band = Image.new("L", img.size, 0), Image.new("L", img.size, 0)
        _draw_body(_Pen(inside), p.body, g, 255)
        for y0, y1 in bands:
            _Pen(band).rect(0, y0, SPRITE, y1, 255)
        img.paste(accent + (255,), (0, 0), Image.fromarray(np.minimum(np.asarray(inside), np.asarray(band))))
    if "belly" in f:
        pen.ellipse(CX, CY + 0.4 * ry, 0.6 * g["rx"], 0.45 * ry, belly)
    if "snout" in f:  # sticks out sideways in the belly's colour: a body-coloured one was a
        # thin change of silhouette that the demo's small vision tower never learned to see
        pen.rect(fx - 0.2 * hw, fy + 0.05 * hw, fx + 2.0 * hw, fy + 0.9 * hw, belly, radius=8)
        pen.line([(fx + 0.2 * hw, fy + 0.52 * hw), (fx + 1.9 * hw, fy + 0.52 * hw)], accent, 3)
        pen.ellipse(fx + 1.7 * hw, fy + 0.3 * hw, 4, 4, accent)
    if "hat" in f:  # a top hat
        pen.rect(fx - 1.05 * hw, top + 0.05 * hw, fx + 1.05 * hw, top + 0.3 * hw, accent)
        pen.rect(fx - 0.6 * hw, top - 0.9 * hw, fx + 0.6 * hw, top + 0.1 * hw, accent)
    if "helmet" in f:  # a dome with a spike
        pen.chord(fx - 1.08 * hw, top - 0.2 * hw, fx + 1.08 * hw, top + 1.3 * hw, 180, 360, accent)
        pen.polygon([(fx - 0.3 * hw, top), (fx + 0.3 * hw, top), (fx, top - 0.8 * hw)], accent)
    # The face.
    for s in (-1, 1):
        ex, ey = fx + s * 0.38 * hw, fy - 0.05 * hw
        if "big_eyes" in f:
            pen.ellipse(ex, ey, 0.3 * hw, 0.34 * hw, WHITE)
            pen.ellipse(ex + 0.05 * hw, ey + 0.05 * hw, 0.15 * hw, 0.17 * hw, black)
        else:
            pen.ellipse(ex, ey, 0.1 * hw, 0.12 * hw, black)
        if "cheeks" in f:
            pen.ellipse(fx + s * 0.64 * hw, fy + 0.4 * hw, 0.18 * hw, 0.16 * hw, accent)
        if "moustache" in f:
            pen.ellipse(fx + s * 0.3 * hw, fy + 0.45 * hw, 0.34 * hw, 0.13 * hw, accent)
    pen.ellipse(fx, fy + 0.25 * hw, 0.09 * hw, 0.07 * hw, black)  # nose
    return img.resize((SPRITE, SPRITE), Image.LANCZOS)


@lru_cache(maxsize=None)
def sprite(entity_id: str, design: int = 0) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The character's RGBA sprite and the box around its visible pixels."""
    if entity_id not in PARTS and entity_id not in STRANGERS:
        raise KeyError(f"no drawing for {entity_id!r}; known: {', '.join([*PARTS, *STRANGERS])}")
    if design not in DESIGNS:
        raise KeyError(f"no design {design!r}; known: {', '.join(map(str, DESIGNS))}")
    img = _draw(entity_id, design)
    return img, img.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()


# ---------------------------------------------------------------------------------------------
# Rendering: pose, background, clutter, occlusion, lighting.

# Clutter takes half of its colours from the characters' palettes, so a patch of a body colour
# in the picture says nothing about who is shown.
_PALETTE_COLOURS = np.array(sorted({COLOURS[c] for p in PARTS.values() for c in p.palette}), dtype=np.float32)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    return x, y


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        c = _PALETTE_COLOURS[rng.integers(len(_PALETTE_COLOURS))] + rng.normal(0, 12, 3)
    else:
        c = rng.integers(0, 256, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c0 = np.array(_random_colour(rng), np.float32)
    if rng.random() < 0.4:  # plain
        return np.broadcast_to(c0, (size, size, 3)).copy()
    c1 = np.array(_random_colour(rng), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    x, y = _grid(size)
    t = (x * math.cos(angle) + y * math.sin(angle))[..., None] + 0.5  # about 0..1 across the frame
    return c0 * (1 - t) + c1 * t


def _shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box, fill) -> None:
    x0, y0, x1, y1 = box
    kind = rng.integers(4)
    if kind == 0:
        draw.ellipse(box, fill=fill)
    elif kind == 1:
        draw.rectangle(box, fill=fill)
    elif kind == 2:
        draw.polygon([(x0, y1), (x1, y1), (rng.uniform(x0, x1), y0)], fill=fill)
    else:
        draw.line([(x0, y0), (x1, y1)], fill=fill, width=max(2, int((x1 - x0) / 6)))


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def _place(entity_id: str, rng: np.random.Generator, size: int, canonical: bool, design: int = 0):
    """The sprite turned, scaled, flipped and moved onto a size x size RGBA layer, and the
    character's box in the frame."""
    img, (bx0, by0, bx1, by1) = sprite(entity_id, design)
    w, h = bx1 - bx0, by1 - by0
    if canonical:
        angle, flip, frac, squash = 0.0, 1.0, 0.7, 1.0
    else:
        angle = math.radians(rng.uniform(-25, 25))
        flip = -1.0 if rng.random() < 0.5 else 1.0
        frac = rng.uniform(0.45, 0.85)  # the character's longer side, as a share of the frame
        squash = rng.uniform(0.9, 1.1)  # a little stretch, as a change of pose
    cos, sin = math.cos(angle), math.sin(angle)
    w, h = w * squash, h / squash
    turned_w, turned_h = abs(w * cos) + abs(h * sin), abs(w * sin) + abs(h * cos)
    scale = frac * size / max(turned_w, turned_h)
    half_w, half_h = turned_w * scale / 2, turned_h * scale / 2
    if canonical:
        ox, oy = size / 2, size / 2
    else:
        ox, oy = rng.uniform(half_w, size - half_w), rng.uniform(half_h, size - half_h)
    # Output pixel -> sprite pixel: the inverse of (flip, squash, rotate, scale, move).
    sx, sy = flip / (scale * squash), squash / scale
    a, b = sx * cos, sx * sin
    d, e = -sy * sin, sy * cos
    mx, my = (bx0 + bx1) / 2, (by0 + by1) / 2
    layer = img.transform((size, size), Image.AFFINE, (a, b, mx - a * ox - b * oy, d, e, my - d * ox - e * oy),
                          resample=Image.BILINEAR)
    return layer, (ox - half_w, oy - half_h, ox + half_w, oy + half_h)


def render(entity_id: str, rng: np.random.Generator, size: int = 168, canonical: bool = False,
           design: int = 0) -> Image.Image:
    """One RGB picture of the character. Everything random comes from `rng`, so the same rng
    state gives the same picture. `canonical=True`: centred, upright, 70% of a white frame, no
    clutter, occlusion or jitter (and `rng` is not used)."""
    layer, box = _place(entity_id, rng, size, canonical, design)
    alpha = layer.getchannel("A")
    if canonical:
        frame = Image.new("RGB", (size, size), WHITE)
        frame.paste(layer, (0, 0), alpha)
        return frame
    frame = Image.fromarray(_background(rng, size).astype(np.uint8))
    draw = ImageDraw.Draw(frame)
    char_area = (box[2] - box[0]) * (box[3] - box[1])
    for _ in range(rng.integers(2, 6)):  # clutter, behind the character and mostly beside it
        for _try in range(6):
            side = rng.uniform(0.1, 0.3) * size
            x, y = rng.uniform(-side / 3, size - side / 2, 2)
            shape_box = (x, y, x + side * rng.uniform(0.5, 1.5), y + side)
            area = (shape_box[2] - x) * side
            if _overlap(shape_box, box) <= 0.15 * min(area, char_area):
                _shape(draw, rng, shape_box, _random_colour(rng))
                break
    frame.paste(layer, (0, 0), alpha)
    if rng.random() < 0.3:  # an occluder over at most 15% of the character's pixels
        mask = np.asarray(alpha) > 128
        ys, xs = np.nonzero(mask)
        if len(xs):
            i = rng.integers(len(xs))
            area = rng.uniform(0.04, 0.15) * len(xs)
            aspect = rng.uniform(0.5, 2)
            pw, ph = math.sqrt(area * aspect), math.sqrt(area / aspect)
            x0, y0 = xs[i] - pw / 2, ys[i] - ph / 2
            occluder = (x0, y0, x0 + pw, y0 + ph)
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(occluder, fill=_random_colour(rng))
    return Image.fromarray(_jitter(np.asarray(frame, dtype=np.float32), rng))


def _jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small lighting changes: a hue turn of up to 8 degrees (about the grey axis), contrast and
    brightness within 15% and 12% -- small enough that brown stays brown and orange stays orange."""
    hue = math.radians(rng.uniform(-8, 8))
    cos, sin, k = math.cos(hue), math.sin(hue), 1 / 3
    r = math.sqrt(k)
    turn = np.array([[cos + (1 - cos) * k, k * (1 - cos) - r * sin, k * (1 - cos) + r * sin],
                     [k * (1 - cos) + r * sin, cos + (1 - cos) * k, k * (1 - cos) - r * sin],
                     [k * (1 - cos) - r * sin, k * (1 - cos) + r * sin, cos + (1 - cos) * k]], np.float32)
    contrast, brightness = rng.uniform(0.85, 1.15), rng.uniform(0.88, 1.12)
    out = pixels @ turn.T
    mean = out.mean()
    out = ((out - mean) * contrast + mean) * brightness
    return np.clip(out, 0, 255).astype(np.uint8)


def canonical_mask(entity_id: str, size: int = 168) -> np.ndarray:
    """[size, size] bools: where the character is in its canonical picture."""
    layer, _ = _place(entity_id, None, size, canonical=True)
    return np.asarray(layer.getchannel("A")) > 128


def _rng_for(seed: int, entity_id: str, n: int, design: int = 0) -> np.random.Generator:
    # crc32, not hash(): stable across runs, and one character's pictures don't depend on the others.
    # Design 0 keeps the key it always had, so the pictures the shipped base learned from stay the same.
    return np.random.default_rng([seed, zlib.crc32(entity_id.encode()), n, *([design] if design else [])])


def write_images(folder: str | Path, ids=None, per_entity: int = 60, seed: int = 0,
                 size: int = 168, design: int = 0) -> dict[str, list[Path]]:
    """Write `folder/<entity_id>/<n>.png` (n zero-padded, so path order is drawing order), the
    layout `cultvlm data check` and `data build` read with `--images folder`. The same seed
    always writes the same files."""
    folder = Path(folder)
    written = {}
    for entity_id in ids or list(PARTS):
        out = folder / entity_id
        out.mkdir(parents=True, exist_ok=True)
        written[entity_id] = []
        for n in range(per_entity):
            path = out / f"{n:04d}.png"
            render(entity_id, _rng_for(seed, entity_id, n, design), size, design=design).save(path)
            written[entity_id].append(path)
    return written
