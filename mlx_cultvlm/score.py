"""Score a VLM's free-text answers (Russian or English) against the entity catalog, as a careful
human reader would.

The public interface (eval, report and tests use it):

    scorer = AnswerScorer(catalog)
    scorer.named(answer)                 the one entity the answer affirms, or None (none, or several)
    scorer.candidates(answer)            the entities it puts forward as the answer (several: a hedge)
    scorer.verify(answer, asked_id)      "yes" / "no" / None for "Is this <asked>?"
    scorer.fact_correct(answer, id)      it names `id` (and no other) and states its work or author

How names are found:
- words are compared through *keys*: every pymorphy3 lemma of the word (all parses, not just the
  top one: the top parse of «Гены» is «ген»), ё folded to е, then transliterated to one Latin
  spelling, so «Чебурашку», "Cheburashka" and "Čeburaška" share a key;
- a catalog name is a sequence of words (hyphens split: «Винни-Пух» = «Винни Пух»); it matches
  consecutive answer words; the longest match wins and matches never overlap, so
  «диснеевский Винни-Пух» names Disney's Pooh, not the Soviet one;
- small misspellings match by rapidfuzz ratio, but only for words the Russian dictionary does not
  know (a real word like «мышка» is never a misspelt «Мишка») and only above a threshold that
  keeps every catalog name word apart from every other entity's name words.

What a found name means -- each one is, in turn:
- *denied*: «не/ни/нет/вместо/чем», "not/no/never/…n't/than/instead of/unlike", «в отличие от»
  at most three words before it in the same clause (clauses end at punctuation and at «а/но»,
  "but"); hedges in between ("not sure", «не уверен», "no doubt", "not only") do not deny. A name
  in a question the answer then answers with no («Чебурашка? Нет, это Гена.»), or leaves
  unanswered, is not affirmed either;
- *a side mention*: it stands beside the subject rather than being it -- a possessive
  ("Cheburashka's friend"), an oblique Russian case in every singular reading («друг Чебурашки»,
  «с Геной»), after a preposition («про», «с», "of", "with", "about", …), or inside a title (in
  quotes, or a catalog work such as «Крокодил Гена и его друзья»);
- *identified*: presented as what the picture shows -- the answer's first words, or after a cue
  in the same clause («это», «на картинке», «похоже на», "this is", "shows", "looks like",
  "might be", "named", …).
Names joined by «и/или», "and/or" or commas share the standing of the first. The answer's
candidates are the identified entities; if none, the named ones that are no side mention; if none,
the side mentions. One candidate is the answer; several (a hedge "X или Y", a list) are none. A
correction ("…, but it's actually Y", «на самом деле») keeps only what follows it.

Generic catalog aliases (Волк, Заяц, Мишка, Ёжик, Гена, Pooh) are names like any other: «волков»
(also a surname), a plain «ёжик» or "Pooh" name the catalog's entity. Proper-noun readings need a
capital letter, though: lower-case «гены» are genes, «Гены» is Гена.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import pymorphy3
from rapidfuzz import fuzz, process

from .data.catalog import ORIGIN_KEYS, Entity, spelling_key

# Fuzzy ratio (0-100) a misspelt word needs; raised automatically if a catalog's names are closer.
DEFAULT_FUZZY_THRESHOLD = 85
# Shorter words are too easy to confuse: they must match exactly.
MIN_FUZZY_LEN = 5
# How many words may stand between a negation and the name it negates ("not a picture of X").
NEGATION_REACH = 3
# How many words may stand between an identification cue and the name ("This is the famous
# Soviet character Cheburashka").
CUE_REACH = 5

_TOKEN = re.compile(r"(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*)|(?P<stop>[,;:.!?()\[\]—–\n]|\s-+\s)")
_SENTENCE_END = re.compile(r"[.!?\n]+")
_QUOTED = re.compile(r"«[^»]*»|\"[^\"]*\"|“[^”]*”|„[^“”]*[“”]")
_CYRILLIC = re.compile(r"[а-яё]")
_PROPER = {"Name", "Surn", "Patr"}

_CLAUSE_WORDS = {"а", "но", "однако", "хотя", "but", "however", "although", "though", "whereas"}
_NEGATIONS = {"не", "ни", "нет", "вместо", "not", "no", "never", "neither", "nor", "without", "unlike"}
# "X rather than Y", «скорее X, чем Y»: Y is not the answer (but «чем-то похож» is no comparison).
_COMPARISONS = {"чем", "than"}
_NEGATION_PAIRS = {("instead", "of"), ("отличие", "от")}
# Words between a negation and a name that make it a hedge, not a denial.
_HEDGES = {"уверен", "уверена", "уверены", "знаю", "помню", "сомневаюсь", "сомнений", "сомнения",
           "только", "лишь", "sure", "certain", "know", "doubt", "doubts", "only", "just"}
# Words right before a name that make it a side mention ("friend of X", «мультфильм про X»).
_SIDE_PREPOSITIONS = {"про", "о", "об", "обо", "у", "от", "для", "с", "со", "к", "ко", "из", "без", "около",
                      "возле", "of", "about", "with", "to", "for", "from", "by", "beside", "next"}
_ARTICLES = {"the", "a", "an"}
# Russian cases of a name that is the subject or the object (what the picture shows).
_DIRECT_CASES = {"nomn", "accs", "acc2", "voct"}
_CASES = _DIRECT_CASES | {"gent", "gen1", "gen2", "datv", "ablt", "loct", "loc1", "loc2"}
# Words and phrases that present a name as what the picture shows, ending right before it (give
# or take CUE_REACH words).
_CUES = [tuple(c.split()) for c in (
    "это вот изображен изображена изображено изображены нарисован нарисована нарисовано нарисованы "
    "картинке картинка изображении рисунке фото фотографии снимке кадре вижу видим видно узнаю похоже "
    "похож похожа напоминает зовут является быть скорее наверное вероятно видимо возможно персонаж "
    "it's that's here's this's shows show showing depicts depicting depicted pictured features see "
    "be named called probably likely maybe perhaps recognize recognise".split()
)] + [tuple(c.split()) for c in (
    "this is", "it is", "that is", "here is", "looks like", "look like", "name is", "character is",
    "image is", "picture is", "drawing is", "перед нами")]
# Opening words that make a clause of their own: «Может быть, это X».
_PARENTHETICAL = {"может", "быть", "возможно", "наверное", "вероятно", "видимо", "скорее", "всего", "кажется",
                  "думаю", "пожалуй", "maybe", "perhaps", "probably", "possibly", "likely", "i", "think"}
# A later name after one of these replaces the ones before ("…, but it's actually Y").
_CORRECTIONS = [("actually",), ("in", "fact"), ("really",), ("самом", "деле"), ("вообще", "то")]
# Between two names: they form one list ("X, Y и Z", "X or Y").
_COORDINATION = re.compile(r"[\s,;/&]*(?:(?:и|или|либо|and|or|nor)[\s,;/&]+)?", re.IGNORECASE)


@lru_cache(maxsize=1)
def _morph() -> pymorphy3.MorphAnalyzer:
    return pymorphy3.MorphAnalyzer()


def _latin_base(word: str) -> str:
    return re.sub(r"(['’]s|s['’])$", "", word)  # possessive: Disney's, Cheburashka's


@lru_cache(maxsize=100_000)
def _answer_keys(word: str) -> tuple[frozenset[str], bool]:
    """Keys of a word as written in an answer (all its lemmas), and whether it may be misspelt."""
    low = word.lower()
    if not _CYRILLIC.search(low):
        key = spelling_key(_latin_base(low))
        return frozenset({key}), len(key) >= MIN_FUZZY_LEN
    morph = _morph()
    # Proper-noun readings only for capitalised words: lower-case «ген» is a gene, not Гена.
    lemmas = {p.normal_form for p in morph.parse(low)
              if word[0].isupper() or not (_PROPER & p.tag.grammemes)}
    keys = frozenset(spelling_key(w) for w in lemmas | {low})
    return keys, not morph.word_is_known(low) and len(spelling_key(low)) >= MIN_FUZZY_LEN


@lru_cache(maxsize=10_000)
def _name_keys(word: str) -> frozenset[str]:
    """Keys of a word as written in a catalog name: its nominative lemma(s), not every reading
    («Гена» is also the genitive of «ген»; only «гена» is kept)."""
    low = word.lower()
    if not _CYRILLIC.search(low):
        return frozenset({spelling_key(_latin_base(low))})
    morph = _morph()
    parses = morph.parse(low)
    nominative = [p for p in parses if "nomn" in p.tag.grammemes]
    if nominative:
        lemmas = {p.normal_form for p in nominative}
    elif morph.word_is_known(low):  # a dependent word in another case: «из мультфильма», «Диснея»
        lemmas = {p.normal_form for p in parses}
    else:
        lemmas = set()
    return frozenset(spelling_key(w) for w in lemmas | {low})


@dataclass(frozen=True)
class _Word:
    text: str
    low: str  # lower case, ё as е, ’ as '
    start: int  # character offsets in the text
    end: int
    clause: int  # punctuation and «а», "but" end a clause
    sentence: int  # . ! ? and line breaks end a sentence


def _words(text: str) -> list[_Word]:
    sentence_of = [0] * (len(text) + 1)
    sentence = 0
    for m in _SENTENCE_END.finditer(text):
        for k in range(m.end(), len(text) + 1):
            sentence_of[k] = sentence + 1
        sentence += 1
    words, clause = [], 0
    for m in _TOKEN.finditer(text):
        if m.group("stop"):
            clause += 1
            continue
        word = m.group("word")
        low = word.lower().replace("ё", "е").replace("’", "'")
        if low in _CLAUSE_WORDS:
            clause += 1
        words.append(_Word(word, low, m.start(), m.end(), clause, sentence_of[m.start()]))
    return words


def _tokens(text: str) -> tuple[list[str], list[int]]:
    """Words of `text` and, for each, the number of its clause."""
    words = _words(text)
    return [w.text for w in words], [w.clause for w in words]


def _ends_with(low: list[str], j: int, phrase: tuple[str, ...]) -> bool:
    """Whether `phrase` occupies the words up to and including j."""
    return j + 1 >= len(phrase) and tuple(low[j + 1 - len(phrase):j + 1]) == phrase


def _negated(words: list[_Word], start: int) -> bool:
    """Whether the name starting at word `start` is denied by a negation shortly before it."""
    low = [w.low for w in words]
    for j in range(start - 1, max(-1, start - NEGATION_REACH - 2), -1):
        if words[j].clause != words[start].clause:
            return False
        negation = (low[j] in _NEGATIONS or low[j].endswith("n't")
                    or any(_ends_with(low, j, pair) for pair in _NEGATION_PAIRS)
                    or (low[j] in _COMPARISONS and low[j + 1] != "то"))
        if negation:
            return not any(w in _HEDGES for w in low[j + 1:start])
    return False


def _cue_before(words: list[_Word], start: int, cues) -> bool:
    """Whether one of `cues` ends at most CUE_REACH words before word `start`, in its clause or
    in a parenthetical one just before it («Может быть, это X, а может быть, Y»)."""
    low = [w.low for w in words]
    clause = words[start].clause
    for j in range(start - 1, max(-1, start - CUE_REACH - 2), -1):
        if words[j].clause != clause:
            opening = [w.low for w in words[:j + 1] if w.clause == words[j].clause]
            if not (words[j].clause == clause - 1 and all(w in _PARENTHETICAL | _CLAUSE_WORDS for w in opening)):
                return False
            clause = words[j].clause
        if any(_ends_with(low, j, cue) for cue in cues):
            return True
    return False


def _denial_lead(low: list[str], k: int) -> bool:
    """Whether word k ends «не думаю», "don't think", «сомневаюсь», "doubt" that is followed by
    what is doubted (not «не думаю, да», "I don't think so")."""
    lead = (_ends_with(low, k, ("не", "думаю")) or _ends_with(low, k, ("не", "считаю"))
            or _ends_with(low, k, ("don't", "think")) or _ends_with(low, k, ("not", "think"))
            or (low[k] in ("сомневаюсь", "doubt") and not (k and low[k - 1] in _NEGATIONS | {"без"})))
    return lead and k + 1 < len(low) and low[k + 1] not in ("so", "да", "нет", "yes", "no")


@lru_cache(maxsize=100_000)
def _only_oblique(word: str, keys: frozenset[str]) -> bool:
    """Whether every singular reading of a Russian answer word that is the name word `keys` is in
    an oblique case («Чебурашки», «Геной»): the name is a side mention, not the subject."""
    if not _CYRILLIC.search(word.lower()):
        return False
    cases = set()
    for p in _morph().parse(word.lower()):
        if spelling_key(p.normal_form) in keys and "plur" not in p.tag.grammemes:
            cases |= _CASES & p.tag.grammemes
    return bool(cases) and not cases & _DIRECT_CASES


@dataclass
class _Match:
    start: int  # word index
    length: int
    entity_id: str
    words: tuple[int, ...]  # the catalog word ids it matched
    denied: bool = False
    side: bool = False  # a side mention
    identified: bool = False


class AnswerScorer:
    """Reads free-text answers against a catalog; built once per catalog (caches lemmas)."""

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
        # Works that are more than a character's name: a name inside one is a side mention.
        works = {str(e.origin[k]) for e in catalog.values() for k in ("work", "work_en") if e.origin.get(k)}
        self._titles = [[_name_keys(w) for w in _tokens(t)[0]] for t in sorted(works) if self.name_of(t) is None]

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

    def name_of(self, phrase: str) -> str | None:
        """The entity whose name `phrase` is, word for word (a work titled «Колобок»), or None."""
        keys = [_name_keys(w) for w in _tokens(phrase)[0]]
        return next((entity_id for entity_id, seq in self._names
                     if keys == [self._word_keys[w] for w in seq]), None)

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

    def _find(self, words: list[_Word]) -> list[_Match]:
        """Non-overlapping name matches, left to right, the longest (then most exact) at each word."""
        hits = [self._hits(w.text) for w in words]
        found, i = [], 0
        while i < len(words):
            best = None  # (length, exact words, entity id, word ids)
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
                            best = (len(seq), exact, entity_id, seq)
            if best is None:
                i += 1
                continue
            found.append(_Match(i, best[0], best[2], best[3]))
            i += best[0]
        return found

    def _in_titles(self, text: str, words: list[_Word]) -> set[int]:
        """Indexes of the words inside a title: in quotes, or a catalog work named in full."""
        quoted = [m.span() for m in _QUOTED.finditer(text)]
        inside = {k for k, w in enumerate(words) if any(a < w.start < b for a, b in quoted)}
        keys = [_answer_keys(w.text) for w in words]
        for title in self._titles:
            for i in range(len(words) - len(title) + 1):
                if all(self._word_matches(keys[i + k], t) for k, t in enumerate(title)):
                    inside |= set(range(i, i + len(title)))
        return inside

    def _matches(self, answer: str) -> tuple[list[_Word], list[_Match]]:
        """The names in an answer, each marked denied, side mention and/or identified."""
        words = _words(answer)
        matches = self._find(words)
        titles = self._in_titles(answer, words)
        low = [w.low for w in words]
        for k, m in enumerate(matches):
            last = words[m.start + m.length - 1]
            before = m.start - 1
            while before >= 0 and low[before] in _ARTICLES:
                before -= 1
            m.denied = _negated(words, m.start) or self._asked_not_confirmed(answer, words, m)
            m.side = (bool(titles & set(range(m.start, m.start + m.length)))
                      or re.search(r"(['’]s|s['’])$", last.text) is not None
                      or (before >= 0 and words[before].clause == words[m.start].clause
                          and low[before] in _SIDE_PREPOSITIONS)
                      or any(_only_oblique(words[m.start + i].text, self._word_keys[wid])
                             for i, wid in enumerate(m.words)))
            m.identified = not m.side and (all(w in _FILLERS for w in low[:m.start])
                                           or _cue_before(words, m.start, _CUES))
            previous = matches[k - 1] if k else None
            if previous and _COORDINATION.fullmatch(answer[words[previous.start + previous.length - 1].end:
                                                           words[m.start].start]):
                # One list, one standing -- but "Gena, Cheburashka's friend" stays a side mention.
                m.side = m.side or previous.side
                m.identified = previous.identified and not m.side
        for lead in (k for k in range(len(words)) if _denial_lead(low, k)):
            # «Не думаю, что это X», "I don't think it's X": the first name after it is denied.
            after = [m for m in matches if m.start > lead and words[m.start].sentence == words[lead].sentence]
            if after:
                after[0].denied = True
        return words, matches

    @staticmethod
    def _asked_not_confirmed(answer: str, words: list[_Word], m: _Match) -> bool:
        """A name in a question («Чебурашка? Нет, это Гена.») unless the next sentence says yes."""
        end = words[m.start].start
        stop = _SENTENCE_END.search(answer, end)
        if not stop or "?" not in stop.group():
            return False
        return yes_no(answer[stop.end():]) != "yes"

    def entities(self, answer: str) -> list[str]:
        """Every entity the answer mentions and does not deny, in order of first appearance
        (side mentions included: «Гена, друг Чебурашки» gives both)."""
        return list(dict.fromkeys(m.entity_id for m in self._matches(answer)[1] if not m.denied))

    def candidates(self, answer: str, side_mentions: bool = True) -> list[str]:
        """The entities the answer puts forward as what the picture shows, in order: from the
        first sentence that affirms a name, the identified ones, else the named ones that are no
        side mention, else (with `side_mentions`) the side mentions (see the module docstring)."""
        words, matches = self._matches(answer)
        affirmed = [m for m in matches if not m.denied]
        corrected = [k for k, m in enumerate(affirmed) if m.identified
                     and _cue_before(words, m.start, _CORRECTIONS)]
        if corrected:
            affirmed = affirmed[corrected[-1]:]
        if not affirmed:
            return []
        first = words[affirmed[0].start].sentence
        affirmed = [m for m in affirmed if words[m.start].sentence == first]
        tiers = [[m for m in affirmed if m.identified], [m for m in affirmed if not m.side]]
        for tier in tiers + [affirmed] * side_mentions:
            if tier:
                return list(dict.fromkeys(m.entity_id for m in tier))
        return []

    def named(self, answer: str) -> str | None:
        """The one entity the answer affirms, or None when it affirms none or several."""
        found = self.candidates(answer)
        return found[0] if len(found) == 1 else None

    def verify(self, answer: str, asked: str) -> str | None:
        """The answer to "Is this <asked>?": yes if it affirms the asked entity, no if it affirms
        another, else what its yes/no words say; None for a hedge between several."""
        found = self.candidates(answer, side_mentions=False)
        if len(found) > 1:
            return None
        if found:
            return "yes" if found[0] == asked else "no"
        said = yes_no(answer)  # «Да, это он, друг крокодила Гены»: Gena is not the answer
        if said is None and self.named(answer):
            return "yes" if self.named(answer) == asked else "no"
        return said

    def fact_correct(self, answer: str, entity_id: str) -> bool:
        """Whether the answer names `entity_id` (and no other as its subject) and states its
        origin (`states_origin`)."""
        return self.named(answer) == entity_id and self.states_origin(answer, entity_id)

    def states_origin(self, text: str, entity_id: str) -> bool:
        """Whether the text mentions the entity's work or author (or their English forms,
        `work_en` / `author_en`) -- never a studio alone, and never a work that is only the
        character's own name (the tale «Колобок»)."""
        origin = self.catalog[entity_id].origin
        phrases = [str(origin[k]) for k in ORIGIN_KEYS
                   if origin.get(k) and self.name_of(str(origin[k])) != entity_id]
        return any(self.mentions(text, p) for p in phrases)

    def mentions(self, answer: str, phrase: str) -> bool:
        """Whether the answer mentions `phrase` (a work title or author from an entity's origin),
        tolerant of inflection, transliteration and small misspellings; negated mentions don't count.

        Also accepted: the quoted part of a phrase («Мельница» for "студия «Мельница»"), the phrase
        without its parenthesis, any one person of a list ("Walt Disney, Ub Iwerks"), a person's
        surname alone («Успенского» for "Эдуард Успенский"), and, when the phrase is a catalog
        name (the work «Ёжик в тумане»), any name of that entity ("Hedgehog in the Fog")."""
        words = _words(answer)
        answer_keys = [_answer_keys(w.text) for w in words]
        for variant in self._phrase_variants(phrase):
            pattern = [_name_keys(w) for w in variant]
            for i in range(len(words) - len(pattern) + 1):
                if all(self._word_matches(answer_keys[i + k], keys) for k, keys in enumerate(pattern)):
                    if not _negated(words, i):
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
        entity_id = self.name_of(phrase)
        if entity_id is not None:
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
        return "no" if any(w in _NO_WORDS for w in words[2:5]) else "yes"  # «Без сомнения, нет.»
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
