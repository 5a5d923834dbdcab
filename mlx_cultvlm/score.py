"""Score a VLM's free-text answers (Russian or English) against the entity catalog.

`AnswerScorer.entities` finds which catalog entities an answer names; `mentions` checks a fact
phrase (a work or an author); `yes_no` reads a verification answer.

How names are matched:
- words are compared through *keys*: every pymorphy3 lemma of the word (all parses, not just the
  top one: the top parse of «Гены» is «ген»), ё folded to е, then transliterated to one Latin
  spelling, so «Чебурашку», "Cheburashka" and "Čeburaška" share a key;
- a catalog name is a sequence of words (hyphens split: «Винни-Пух» = «Винни Пух»); it matches
  consecutive answer words; the longest match wins and matches never overlap, so
  «диснеевский Винни-Пух» names Disney's Pooh, not the Soviet one;
- small misspellings match by rapidfuzz ratio, but only for words the Russian dictionary does not
  know (a real word like «мышка» is never a misspelt «Мишка») and only above a threshold that
  keeps every catalog name word apart from every other entity's name words;
- a name is negated when «не/ни/нет/вместо/чем», "not/no/never/…n't/than/instead of" stands at
  most three words before it in the same clause (clauses end at punctuation and at «а/но»,
  "but"); hedges in between ("not sure", «не уверен», "no doubt", "not only") do not negate.

Generic catalog aliases (Волк, Заяц, Мишка, Ёжик, Гена, Pooh) are names like any other: «волков»
(also a surname), a plain «ёжик» or "Pooh" name the catalog's entity. Proper-noun readings need a
capital letter, though: lower-case «гены» are genes, «Гены» is Гена. A name inside a title counts
too («книга «Крокодил Гена и его друзья»» names Gena): `named` takes the first one.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import pymorphy3
from rapidfuzz import fuzz, process

from .data.catalog import Entity

# Fuzzy ratio (0-100) a misspelt word needs; raised automatically if a catalog's names are closer.
DEFAULT_FUZZY_THRESHOLD = 85
# Shorter words are too easy to confuse: they must match exactly.
MIN_FUZZY_LEN = 5
# How many words may stand between a negation and the name it negates ("not a picture of X").
NEGATION_REACH = 3

_TOKEN = re.compile(r"(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*)|(?P<stop>[,;:.!?()\[\]—–\n]|\s-+\s)")
_CYRILLIC = re.compile(r"[а-яё]")
_PROPER = {"Name", "Surn", "Patr"}

_CYR_TO_LAT = dict(zip("абвгдеёжзийклмнопрстуфхцчшщъыьэюя", [
    "a", "b", "v", "g", "d", "e", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p", "r", "s", "t",
    "u", "f", "kh", "ts", "ch", "sh", "shch", "", "y", "", "e", "yu", "ya"]))
# Romanisations differ (Tchebourachka, Alyosha/Aliosha, Uspensky/Uspenskiy): fold the common ones.
_LATIN_FOLDS = [("š", "sh"), ("č", "ch"), ("ž", "zh"), ("x", "ks"), ("tch", "ch"), ("ou", "u"),
                ("yo", "e"), ("io", "e"), ("ye", "e"), ("ey", "ei")]

_CLAUSE_WORDS = {"а", "но", "однако", "хотя", "but", "however", "although", "though", "whereas"}
_NEGATIONS = {"не", "ни", "нет", "вместо", "not", "no", "never", "neither", "nor", "without"}
# "X rather than Y", «скорее X, чем Y»: Y is not the answer (but «чем-то похож» is no comparison).
_COMPARISONS = {"чем", "than"}
_NEGATION_PAIRS = {("instead", "of")}
# Words between a negation and a name that make it a hedge, not a denial.
_HEDGES = {"уверен", "уверена", "уверены", "знаю", "помню", "сомневаюсь", "сомнений", "сомнения",
           "только", "лишь", "sure", "certain", "know", "doubt", "doubts", "only", "just"}


@lru_cache(maxsize=1)
def _morph() -> pymorphy3.MorphAnalyzer:
    return pymorphy3.MorphAnalyzer()


@lru_cache(maxsize=100_000)
def _skeleton(word: str) -> str:
    """One Latin spelling for a lower-case word of either script (ё = е, Cyrillic transliterated)."""
    text = "".join(_CYR_TO_LAT.get(ch, ch) for ch in word)
    for a, b in _LATIN_FOLDS[:3]:
        text = text.replace(a, b)
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    for a, b in _LATIN_FOLDS[3:]:
        text = text.replace(a, b)
    return re.sub(r"(iy|yy|ii)$", "y", text)  # -ий/-ый endings: Uspensky = Успенский


def _latin_base(word: str) -> str:
    return re.sub(r"(['’]s|s['’])$", "", word)  # possessive: Disney's, Cheburashka's


@lru_cache(maxsize=100_000)
def _answer_keys(word: str) -> tuple[frozenset[str], bool]:
    """Keys of a word as written in an answer (all its lemmas), and whether it may be misspelt."""
    low = word.lower()
    if not _CYRILLIC.search(low):
        key = _skeleton(_latin_base(low))
        return frozenset({key}), len(key) >= MIN_FUZZY_LEN
    morph = _morph()
    # Proper-noun readings only for capitalised words: lower-case «ген» is a gene, not Гена.
    lemmas = {p.normal_form for p in morph.parse(low)
              if word[0].isupper() or not (_PROPER & p.tag.grammemes)}
    keys = frozenset(_skeleton(w) for w in lemmas | {low})
    return keys, not morph.word_is_known(low) and len(_skeleton(low)) >= MIN_FUZZY_LEN


@lru_cache(maxsize=10_000)
def _name_keys(word: str) -> frozenset[str]:
    """Keys of a word as written in a catalog name: its nominative lemma(s), not every reading
    («Гена» is also the genitive of «ген»; only «гена» is kept)."""
    low = word.lower()
    if not _CYRILLIC.search(low):
        return frozenset({_skeleton(_latin_base(low))})
    morph = _morph()
    parses = morph.parse(low)
    nominative = [p for p in parses if "nomn" in p.tag.grammemes]
    if nominative:
        lemmas = {p.normal_form for p in nominative}
    elif morph.word_is_known(low):  # a dependent word in another case: «из мультфильма», «Диснея»
        lemmas = {p.normal_form for p in parses}
    else:
        lemmas = set()
    return frozenset(_skeleton(w) for w in lemmas | {low})


def _tokens(text: str) -> tuple[list[str], list[int]]:
    """Words of `text` and, for each, the number of its clause (punctuation and «а», "but" end one)."""
    words, clauses, clause = [], [], 0
    for m in _TOKEN.finditer(text):
        if m.group("stop"):
            clause += 1
            continue
        word = m.group("word")
        if word.lower() in _CLAUSE_WORDS:
            clause += 1
        words.append(word)
        clauses.append(clause)
    return words, clauses


def _negated(words: list[str], clauses: list[int], start: int) -> bool:
    """Whether the name starting at word `start` is denied by a negation shortly before it."""
    low = [w.lower() for w in words]
    for j in range(start - 1, max(-1, start - NEGATION_REACH - 2), -1):
        if clauses[j] != clauses[start]:
            return False
        negation = (low[j] in _NEGATIONS or low[j].endswith(("n't", "n’t"))
                    or (j > 0 and (low[j - 1], low[j]) in _NEGATION_PAIRS)
                    or (low[j] in _COMPARISONS and low[j + 1] != "то"))
        if negation:
            return not any(w in _HEDGES for w in low[j + 1:start])
    return False


@dataclass(frozen=True)
class _Match:
    start: int
    length: int
    entity_id: str
    negated: bool


class AnswerScorer:
    """Finds catalog entities named in free-text answers; built once per catalog (caches lemmas)."""

    def __init__(self, catalog: dict[str, Entity], fuzzy_threshold: int | None = None):
        self.catalog = catalog
        # Every catalog name as a sequence of word ids; a word id stands for a set of keys.
        self._word_keys: list[frozenset[str]] = []
        word_ids: dict[frozenset[str], int] = {}
        self._names: list[tuple[str, tuple[int, ...]]] = []
        for entity in catalog.values():
            for name in entity.all_names():
                seq = []
                for word in _tokens(name)[0]:
                    keys = _name_keys(word)
                    if keys not in word_ids:
                        word_ids[keys] = len(self._word_keys)
                        self._word_keys.append(keys)
                    seq.append(word_ids[keys])
                if seq:
                    self._names.append((entity.id, tuple(seq)))
        self._key_to_words: dict[str, set[int]] = {}
        for wid, keys in enumerate(self._word_keys):
            for key in keys:
                self._key_to_words.setdefault(key, set()).add(wid)
        self._by_first: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
        for entity_id, seq in self._names:
            self._by_first.setdefault(seq[0], []).append((entity_id, seq))
        self._fuzzy_keys = sorted(k for k in self._key_to_words if len(k) >= MIN_FUZZY_LEN)
        self.fuzzy_threshold = (fuzzy_threshold if fuzzy_threshold is not None
                                else max(DEFAULT_FUZZY_THRESHOLD, self.closest_foreign_ratio() + 1))
        self._hits_cache: dict[str, tuple[frozenset[int], frozenset[int]]] = {}

    def closest_foreign_ratio(self) -> int:
        """The highest fuzzy ratio between two different name words (no key in common) of two
        different entities: a threshold above it cannot turn one entity's name into another's."""
        owners: dict[int, set[str]] = {}
        for entity_id, seq in self._names:
            for wid in seq:
                owners.setdefault(wid, set()).add(entity_id)
        best = 0.0
        for w1, w2 in itertools.combinations(owners, 2):
            k1, k2 = self._word_keys[w1], self._word_keys[w2]
            if k1 & k2 or (owners[w1] == owners[w2] and len(owners[w1]) == 1):
                continue  # the same word inflected, or two words of one entity
            best = max([best] + [fuzz.ratio(a, b) for a in k1 for b in k2
                                 if len(a) >= MIN_FUZZY_LEN and len(b) >= MIN_FUZZY_LEN])
        return int(best)

    # -- matching ---------------------------------------------------------------------------------

    def _hits(self, word: str) -> tuple[frozenset[int], frozenset[int]]:
        """Catalog word ids this answer word matches: exactly (a shared key) and fuzzily."""
        cached = self._hits_cache.get(word)
        if cached is None:
            keys, may_be_misspelt = _answer_keys(word)
            exact = {wid for key in keys for wid in self._key_to_words.get(key, ())}
            fuzzy = set()
            if may_be_misspelt:
                for key in keys:
                    if len(key) < MIN_FUZZY_LEN:
                        continue
                    for found, _, _ in process.extract(key, self._fuzzy_keys, scorer=fuzz.ratio,
                                                       score_cutoff=self.fuzzy_threshold, limit=None):
                        fuzzy |= self._key_to_words[found]
            cached = self._hits_cache[word] = (frozenset(exact), frozenset(fuzzy - exact))
        return cached

    def _matches(self, answer: str) -> list[_Match]:
        """Non-overlapping name matches, left to right, the longest (then most exact) at each word."""
        words, clauses = _tokens(answer)
        hits = [self._hits(w) for w in words]
        found, i = [], 0
        while i < len(words):
            best = None  # (length, exact words, entity id)
            for wid in hits[i][0] | hits[i][1]:
                for entity_id, seq in self._by_first.get(wid, ()):
                    if i + len(seq) > len(words):
                        continue
                    exact = 0
                    for k, w in enumerate(seq):
                        if w in hits[i + k][0]:
                            exact += 1
                        elif w not in hits[i + k][1]:
                            break
                    else:
                        if best is None or (len(seq), exact) > best[:2]:
                            best = (len(seq), exact, entity_id)
            if best is None:
                i += 1
                continue
            found.append(_Match(i, best[0], best[2], _negated(words, clauses, i)))
            i += best[0]
        return found

    def entities(self, answer: str) -> list[str]:
        """Ids of catalog entities the answer names affirmatively, in order of first appearance.
        An entity both denied and affirmed ("not X… actually X") counts as named."""
        named: list[str] = []
        for m in self._matches(answer):
            if not m.negated and m.entity_id not in named:
                named.append(m.entity_id)
        return named

    def named(self, answer: str) -> str | None:
        """The entity the answer identifies: the first one it names, or None."""
        found = self.entities(answer)
        return found[0] if found else None

    def mentions(self, answer: str, phrase: str) -> bool:
        """Whether the answer mentions `phrase` (a work title or author from an entity's origin),
        tolerant of inflection, transliteration and small misspellings; negated mentions don't count.

        Also accepted: the quoted part of a phrase («Мельница» for "студия «Мельница»"), the phrase
        without its parenthesis, any one person of a list ("Walt Disney, Ub Iwerks"), a person's
        surname alone («Успенского» for "Эдуард Успенский"), and, when the phrase is a catalog
        name (the work «Ёжик в тумане»), any name of that entity ("Hedgehog in the Fog")."""
        words, clauses = _tokens(answer)
        answer_keys = [_answer_keys(w) for w in words]
        for variant in self._phrase_variants(phrase):
            pattern = [_name_keys(w) for w in variant]
            for i in range(len(words) - len(pattern) + 1):
                if all(self._word_matches(answer_keys[i + k], keys) for k, keys in enumerate(pattern)):
                    if not _negated(words, clauses, i):
                        return True
        return False

    def _word_matches(self, answer: tuple[frozenset[str], bool], name: frozenset[str]) -> bool:
        keys, may_be_misspelt = answer
        if keys & name:
            return True
        return may_be_misspelt and any(
            len(a) >= MIN_FUZZY_LEN and len(b) >= MIN_FUZZY_LEN and fuzz.ratio(a, b) >= self.fuzzy_threshold
            for a in keys for b in name)

    def _phrase_variants(self, phrase: str) -> list[list[str]]:
        texts = [phrase, re.sub(r"\([^)]*\)", " ", phrase)]
        texts += [a or b for a, b in re.findall(r"«([^»]+)»|\"([^\"]+)\"", phrase)]
        parts = [p for p in re.split(r"[,;]", phrase) if p.strip()]
        if len(parts) > 1 and any(len(_tokens(p)[0]) > 1 for p in parts):  # a list, not «Ну, погоди!»
            texts += parts
        variants = [_tokens(t)[0] for t in texts]
        for words in list(variants):
            # "Имя Фамилия": the surname alone is a mention of the person.
            if len(words) == 2 and _is_given_name(words[0]) and words[1][:1].isupper():
                variants.append(words[1:])
        phrase_words = _tokens(phrase)[0]
        for entity_id, seq in self._names:
            if [_name_keys(w) for w in phrase_words] == [self._word_keys[w] for w in seq]:
                variants += [_tokens(n)[0] for n in self.catalog[entity_id].all_names()]
        return [v for v in variants if v]


def _is_given_name(word: str) -> bool:
    """A first name: pymorphy's Name tag for Cyrillic; for Latin, a capitalised word (with a
    following capitalised surname that is the best guess available without an English lexicon)."""
    if not word[:1].isupper():
        return False
    if not _CYRILLIC.search(word.lower()):
        return True
    return any("Name" in p.tag.grammemes for p in _morph().parse(word.lower()))


# -- yes / no --------------------------------------------------------------------------------------

_WORDS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_FILLERS = {"ну", "хм", "эм", "итак", "ответ", "well", "hmm", "so", "ok", "okay", "oh", "ah", "answer"}
# A yes when the answer opens with it; the softer words below need no negation after them.
_YES_FIRST = {"да", "ага", "угу", "верно", "правильно", "yes", "yeah", "yep", "yup", "correct"}
_YES_WORDS = _YES_FIRST | {"конечно", "безусловно", "разумеется", "точно", "именно", "определенно",
                           "несомненно", "indeed", "certainly", "definitely",
                           "absolutely", "sure", "course"}
_NO_WORDS = {"нет", "неа", "неверно", "неправильно", "no", "nope", "incorrect", "wrong"}
_UNSURE = [("не", "уверен"), ("не", "уверена"), ("не", "знаю"), ("не", "могу"), ("трудно", "сказать"),
           ("сложно", "сказать"), ("может", "быть"), ("возможно",), ("неясно",), ("непонятно",),
           ("not", "sure"), ("not", "certain"),
           ("hard", "to", "say"), ("difficult", "to", "say"), ("maybe",), ("perhaps",), ("possibly",),
           ("unclear",), ("cannot",), ("can't",), ("unable",), ("don't", "know"), ("do", "not", "know")]
_YES_AND_NO = [("и", "да", "и", "нет"), ("да", "и", "нет"), ("yes", "and", "no")]
# A leading "no" that means yes.
_NO_DOUBT = [("no", "doubt"), ("нет", "сомнений"), ("без", "сомнения"), ("без", "сомнений")]
_YES_PHRASES = [("i", "think", "so"), ("i", "believe", "so"), ("думаю", "да"), ("думаю", "что", "да"),
                ("кажется", "да"), ("похоже", "да"), ("похоже", "что", "да"), ("that's", "right"),
                ("that", "is", "right"), ("you're", "right"), ("you", "are", "right"), ("вы", "правы"),
                ("это", "он"), ("это", "она"), ("it's", "him"), ("it's", "her"), ("it", "is", "him"),
                ("it", "is", "her"), ("that's", "him"), ("that's", "her"), ("this", "is", "him"),
                ("this", "is", "her"), ("that", "is", "him"), ("that", "is", "her")]


def _has(words: list[str], phrase: tuple[str, ...]) -> bool:
    n = len(phrase)
    return any(tuple(words[i:i + n]) == phrase for i in range(len(words) - n + 1))


def yes_no(answer: str) -> str | None:
    """'yes' / 'no' for a verification answer ("Да, это…", "No, it is…", "Конечно, это он",
    "Это не он", "I think so"); None when it hedges or does not say. Only the first sentence is
    read, and only its first words for a bare yes or no. "Это Чебурашка" alone is None: the caller
    compares the named entity itself."""
    text = answer.strip().lower().replace("ё", "е").replace("’", "'")
    words = _WORDS.findall(re.split(r"[.!?\n]", text, maxsplit=1)[0])
    while words and words[0] in _FILLERS:
        words = words[1:]
    if not words:
        return None
    if words[:2] == ["да", "нет"]:
        return "no"  # «Да нет, это Гена»
    if any(_has(words[:4], p) for p in _YES_AND_NO):
        return None
    if any(_has(words[:3], p) for p in _NO_DOUBT):
        return "yes"
    if words[0] in _YES_FIRST:
        return "yes"  # "Yes, but not the Disney one" is still a yes
    if words[0] in _NO_WORDS:
        return "no"
    if any(_has(words, p) for p in _UNSURE):
        return None
    if any(w in _NO_WORDS or w in _NEGATIONS or w.endswith("n't") for w in words[:4]):
        return "no"  # «Это не он», "It's not him", "I don't think so", «Конечно, нет»
    if any(w in _YES_WORDS for w in words[:3]) or any(_has(words, p) for p in _YES_PHRASES):
        return "yes"  # «Конечно, это он», "I think so", «Я думаю, что это он»
    return "yes" if words == ["it", "is"] else None
