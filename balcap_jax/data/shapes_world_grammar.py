"""The closed English of ShapesWorld: a lexicon and a total parser from any caption text to atomic claims.

`parse_caption(text)` never raises: unknown words, fragments, repetition, empty strings and non-ASCII text all
parse, into fewer (or unverifiable) claims and grammar violations. The judge (`rewards/shapes_world/components.py`)
checks the claims against a scene graph; this module knows nothing about any particular image.

Parsing, per sentence (split after . ! ?), per clause (split at , ; : and "and" / "while" / "with" / "but"):
  noun phrase   [det | number] [size] [colour] noun        "a small red circle", "the triangle", "two squares"
  region        [in|at|on|near] [the] region-words [corner|side|...] [of the image]   "in the top left corner"
  relation      ("to the")? "left of" | "right of" | "above" | "below" (+ synonyms), followed by a noun phrase
  predicate     "is" / "are" followed by size or colour adjectives                       "the circle is small"
Claims (what a clause asserts), with `Mention` = the colour / shape / size a noun phrase states:
  exists(m)               an indefinite singular noun phrase ("a red circle")
  size(m, s)              a size adjective in an indefinite noun phrase, or a size predicate
  colour(m, c)            a colour predicate ("the circle is red")
  region(m, r)            a region phrase attached to a noun phrase (before or after it, or fronted in its own
                          clause: "In the top left, there is ..."), or to the previous subject ("... and is in
                          the center")
  relation(m1, rel, m2)   subject (nearest noun phrase before, else the first after as in "Below the circle is a
                          square", else the previous subject) and object
  count(m, n)             a number with a plural noun ("three shapes") or "one"/"single" with a generic noun
  unverifiable(text)      a clause with content but no checkable claim (unknown words, negation, stray plurals):
                          it is not pointable, so it can never be correct
Identity of a mention: an indefinite noun phrase's size is asserted (a size claim), not used to identify the
object, unless the phrase has no colour; a definite noun phrase identifies by everything it states.

Grammar rules (each sentence is grammatical iff it breaks none; `SentenceReport.violations` names them):
  G1 every word is in the ShapesWorld lexicon;
  G2 every clause contributes a claim (no fragments, no dangling region or relation); a clause that is only a
     definite noun phrase ("The red circle, which is small, ...") contributes by naming the next clauses'
     subject, and a pronoun clause ("It is small.") takes the previous subject;
  G3 a singular noun phrase has a determiner, and "a"/"an" agrees with the next word's first letter;
  G4 at most one size and one colour adjective per noun phrase, size before colour;
  G5 no word is immediately repeated;
  G6 the sentence has a verb (is, are, sits, appears, contains, ...): a bare noun phrase is a fragment.
A sentence is well formed iff its first letter is upper case, it ends with . ! or ?, and it has 3–40 words.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from balcap_jax.data import shapes_world as world

# ----------------------------------------------------------------------------------------------------------
# Lexicon

SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
# Colours and shapes outside the world still parse (so invented objects become false claims, not noise).
COLOUR_WORDS = {c: c for c in (*world.COLOURS, "orange", "black", "white", "pink", "brown", "grey", "gray")}
SINGULAR_SHAPES = {s: s for s in (*world.SHAPES, "star", "rectangle", "hexagon", "oval", "pentagon")}
PLURAL_SHAPES = {s + "s": s for s in SINGULAR_SHAPES}
GENERIC_NOUNS = {"shape", "object", "figure", "item"}
GENERIC_PLURALS = {n + "s" for n in GENERIC_NOUNS}
NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                       "nine", "ten"))}
INDEFINITE = {"a", "an", "one", "another"}
DEFINITE = {"the", "this", "that"}
VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
HORIZONTAL = {"left": "left", "right": "right"}
CENTRAL = {"center", "centre", "middle", "central"}
REGION_NOUNS = {"corner", "side", "edge", "part", "area", "half", "region"}
REGION_PREPOSITIONS = {"in", "at", "on", "near", "toward", "towards"}
IMAGE_NOUNS = {"image", "picture", "scene", "canvas", "frame", "photo"}
VERTICAL_RELATIONS = {"above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
                      "underneath": "below"}
NEGATIONS = {"no", "not", "never", "nothing", "none", "neither", "nor", "without", "isn", "aren"}
CLAUSE_BREAKS = {",", ";", ":", "and", "while", "with", "but", "whereas"}
COPULAS = {"is", "are"}
FILLERS = {
    "there", "it", "its", "which", "exactly", "only", "total", "just", "also", "each", "both", "single", "of", "to",
    "appears", "appear", "sits", "sit", "lies", "lie", "located", "placed", "positioned", "can", "be", "seen", "we",
    "see", "shows", "show", "contains", "contain", "has", "have", "found", "is", "are", "in", "at", "on", "near",
    "toward", "towards", "s", *IMAGE_NOUNS, *DEFINITE, "a", "an", "another",
}
LEXICON = (set(SIZE_WORDS) | set(COLOUR_WORDS) | set(SINGULAR_SHAPES) | set(PLURAL_SHAPES) | GENERIC_NOUNS
           | GENERIC_PLURALS | set(NUMBERS) | INDEFINITE | DEFINITE | set(VERTICAL) | set(HORIZONTAL) | CENTRAL
           | REGION_NOUNS | REGION_PREPOSITIONS | IMAGE_NOUNS | set(VERTICAL_RELATIONS) | NEGATIONS
           | CLAUSE_BREAKS | COPULAS | FILLERS | {".", "!", "?"})

VERBS = {"is", "are", "sits", "sit", "lies", "lie", "appears", "appear", "shows", "show", "contains", "contain", "has",
         "have", "be", "see", "found"}
# Letter runs (any script), digit runs, clause/sentence punctuation, and runs of anything else.
_TOKEN = re.compile(r"[^\W\d_]+|\d+|[.,;:!?]|[^\w\s.,;:!?]+|_+")
_SENTENCE = re.compile(r"[^.!?]*[.!?]+|[^.!?]+$")


def tokenize(text: str) -> list[str]:
    """Lower-cased words, digits and punctuation; any other run of characters is one (unknown) token."""
    return _TOKEN.findall(text.lower().replace("-", " "))


# ----------------------------------------------------------------------------------------------------------
# Claims


@dataclasses.dataclass(frozen=True)
class Mention:
    """What a noun phrase states about its object; None = not stated (shape None = a generic noun)."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None

    def describe(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape or "object") if w)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One atomic claim. kind in {exists, size, colour, region, relation, count, unverifiable}.

    `mention` is the subject; `other` the relation's object; `value` the size / colour / region / relation
    name / count; `text` the clause it came from (the identity of an unverifiable claim)."""

    kind: str
    mention: Mention | None = None
    value: str | int | None = None
    other: Mention | None = None
    text: str = ""

    def key(self) -> tuple:
        """Identity for de-duplication: unverifiable claims are distinct per clause text."""
        return (self.kind, self.mention, self.value, self.other, self.text if self.kind == "unverifiable" else "")

    def describe(self) -> str:
        m = self.mention.describe() if self.mention else ""
        if self.kind == "exists":
            return f"there is a {m}"
        if self.kind == "relation":
            return f"the {m} is {self.value} the {self.other.describe() if self.other else '?'}"
        if self.kind == "count":
            return f"there are {self.value} {m}"
        if self.kind == "unverifiable":
            return f"unverifiable: {self.text!r}"
        return f"the {m} is {self.value}" if self.kind != "region" else f"the {m} is in the {self.value}"


@dataclasses.dataclass(frozen=True)
class SentenceReport:
    text: str
    grammatical: bool
    well_formed: bool
    violations: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    """Claims in caption order (with repeats) and one report per sentence."""

    claims: tuple[Claim, ...]
    sentences: tuple[SentenceReport, ...]
    unknown_words: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------------
# Phrase recognisers: each takes (tokens, i) and returns (phrase, next index) or None.


@dataclasses.dataclass(frozen=True)
class _NounPhrase:
    determiner: str | None
    number: int | None
    sizes: tuple[str, ...]
    colours: tuple[str, ...]
    shape: str | None  # None for generic nouns
    plural: bool
    adjective_order_ok: bool
    after_determiner: str | None  # the word after the determiner, for a/an agreement

    @property
    def definite(self) -> bool:
        return self.determiner in DEFINITE

    @property
    def is_count(self) -> bool:
        generic_one = self.shape is None and not self.plural and self.number == 1
        return (self.plural and self.number is not None) or generic_one

    def identity(self) -> Mention:
        colour = self.colours[0] if self.colours else None
        size = self.sizes[0] if self.sizes else None
        if not self.definite and colour is not None:
            size = None  # asserted by a size claim, not used to identify
        return Mention(colour=colour, shape=self.shape, size=size)


def _is_numeral(token: str) -> bool:
    return token.isascii() and token.isdigit()


def _noun_phrase(tokens: list[str], i: int) -> tuple[_NounPhrase, int] | None:
    determiner, number = None, None
    if i < len(tokens) and (tokens[i] in INDEFINITE or tokens[i] in DEFINITE):
        determiner = tokens[i]
        number = 1 if tokens[i] == "one" else None
        i += 1
    after_determiner = tokens[i] if determiner is not None and i < len(tokens) else None
    if i < len(tokens) and tokens[i] == "single":
        number, i = 1, i + 1
    if i < len(tokens) and (tokens[i] in NUMBERS or _is_numeral(tokens[i])) and number is None:
        number = int(tokens[i][:6]) if _is_numeral(tokens[i]) else NUMBERS[tokens[i]]
        i += 1
    sizes, colours, order = [], [], []
    while i < len(tokens) and (tokens[i] in SIZE_WORDS or tokens[i] in COLOUR_WORDS):
        if tokens[i] in SIZE_WORDS:
            sizes.append(SIZE_WORDS[tokens[i]])
            order.append("size")
        else:
            colours.append(COLOUR_WORDS[tokens[i]])
            order.append("colour")
        i += 1
    if i >= len(tokens):
        return None
    word = tokens[i]
    if word in SINGULAR_SHAPES:
        shape, plural = SINGULAR_SHAPES[word], False
    elif word in PLURAL_SHAPES:
        shape, plural = PLURAL_SHAPES[word], True
    elif word in GENERIC_NOUNS:
        shape, plural = None, False
    elif word in GENERIC_PLURALS:
        shape, plural = None, True
    else:
        return None
    order_ok = len(sizes) <= 1 and len(colours) <= 1 and order == sorted(order, key=lambda k: k != "size")
    return (_NounPhrase(determiner, number, tuple(sizes), tuple(colours), shape, plural, order_ok, after_determiner),
            i + 1)


def _relation(tokens: list[str], i: int) -> tuple[str, int] | None:
    """'to the left of', 'left of', 'on the right of', 'above', ... ; not 'left of the image' (a region)."""
    j = i
    if j < len(tokens) and tokens[j] in ("to", "on"):
        j += 1
        if j < len(tokens) and tokens[j] == "the":
            j += 1
    if j < len(tokens) and tokens[j] in VERTICAL_RELATIONS and j == i:
        return VERTICAL_RELATIONS[tokens[j]], j + 1
    if j + 1 < len(tokens) and tokens[j] in HORIZONTAL and tokens[j + 1] == "of":
        after = tokens[j + 2 : j + 4]
        if after and (after[0] in IMAGE_NOUNS or after[-1] in IMAGE_NOUNS):
            return None
        return f"{HORIZONTAL[tokens[j]]} of", j + 2
    return None


def _region(tokens: list[str], i: int) -> tuple[str | None, int] | None:
    """A region phrase; returns (region name or None if self-contradictory, next index)."""
    j = i
    if j < len(tokens) and tokens[j] in REGION_PREPOSITIONS:
        j += 1
    if j < len(tokens) and tokens[j] == "the":
        j += 1
    vertical, horizontal, words = set(), set(), 0
    while j < len(tokens) and (tokens[j] in VERTICAL or tokens[j] in HORIZONTAL or tokens[j] in CENTRAL):
        if tokens[j] in VERTICAL:
            vertical.add(VERTICAL[tokens[j]])
        elif tokens[j] in HORIZONTAL:
            if j + 1 < len(tokens) and tokens[j + 1] == "of" and _relation(tokens, j) is not None:
                break
            horizontal.add(HORIZONTAL[tokens[j]])
        j += 1
        words += 1
    if words == 0:
        return None
    if j < len(tokens) and tokens[j] in REGION_NOUNS:
        j += 1
    if j + 1 < len(tokens) and tokens[j] == "of":  # "... of the image"
        k = j + 1 + (tokens[j + 1] == "the")
        if k < len(tokens) and tokens[k] in IMAGE_NOUNS:
            j = k + 1
    if len(vertical) > 1 or len(horizontal) > 1:
        return None, j
    name = " ".join([*sorted(vertical), *sorted(horizontal)]) or "center"
    return name, j


# ----------------------------------------------------------------------------------------------------------
# Clause and caption parsing


@dataclasses.dataclass
class _Clause:
    tokens: list[str]
    items: list[tuple]  # ("np", _NounPhrase) | ("rel", name, _NounPhrase | None) | ("region", name)
    #                    | ("pred", kind, value)
    unknown: list[str]
    negated: bool
    content: bool  # has any non-filler token


def _scan_clause(tokens: list[str]) -> _Clause:
    items, unknown, negated, content = [], [], False, False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        rel = _relation(tokens, i)
        if rel is not None:
            name, j = rel
            np_ = _noun_phrase(tokens, j)
            items.append(("rel", name, np_[0] if np_ else None))
            content = True
            i = np_[1] if np_ else j
            continue
        region = _region(tokens, i)
        if region is not None:
            items.append(("region", region[0]))
            content = True
            i = region[1]
            continue
        np_ = _noun_phrase(tokens, i)
        if np_ is not None:
            items.append(("np", np_[0]))
            content = True
            i = np_[1]
            continue
        is_adjective = i + 1 < len(tokens) and (tokens[i + 1] in SIZE_WORDS or tokens[i + 1] in COLOUR_WORDS)
        if tok in COPULAS and is_adjective and _noun_phrase(tokens, i + 1) is None:
            j = i + 1
            while j < len(tokens) and (tokens[j] in SIZE_WORDS or tokens[j] in COLOUR_WORDS):
                kind = "size" if tokens[j] in SIZE_WORDS else "colour"
                items.append(("pred", kind, SIZE_WORDS.get(tokens[j]) or COLOUR_WORDS[tokens[j]]))
                j += 1
            content = True
            i = j
            continue
        if tok in NEGATIONS:
            negated = content = True
        elif tok not in LEXICON:
            unknown.append(tok)
            content = True
        elif tok not in FILLERS:
            content = True  # a lexicon word out of place (e.g. a stray adjective): content with no claim
        i += 1
    return _Clause(tokens, items, unknown, negated, content)


def _split_clauses(tokens: list[str]) -> list[list[str]]:
    clauses, current = [], []
    for tok in tokens:
        if tok in CLAUSE_BREAKS:
            if current:
                clauses.append(current)
            current = []
        elif tok not in (".", "!", "?"):
            current.append(tok)
    if current:
        clauses.append(current)
    return clauses


def _np_violations(np_: _NounPhrase) -> list[str]:
    out = []
    if not np_.plural and np_.determiner is None and np_.number is None:
        out.append("G3 singular noun phrase without determiner")
    next_word = np_.after_determiner
    if np_.determiner in ("a", "an") and next_word and next_word[0].isalpha():
        wants = "an" if next_word[0] in "aeiou" else "a"
        if np_.determiner != wants:
            out.append(f"G3 '{np_.determiner} {next_word}' should be '{wants} {next_word}'")
    if not np_.adjective_order_ok:
        out.append("G4 adjectives: at most one size and one colour, size first")
    return out


class _CaptionState:
    """Carries the last subject across clauses and a fronted region to the next noun phrase."""

    def __init__(self):
        self.subject: Mention | None = None
        self.pending_region: str | None = None


def _clause_claims(clause: _Clause, state: _CaptionState, text: str, first_in_sentence: bool
                   ) -> tuple[list[Claim], bool, list[str]]:
    """Claims of one clause, whether it contributed, and grammar violations of its noun phrases."""
    violations = []
    for item in clause.items:
        if item[0] == "np" or (item[0] == "rel" and item[2] is not None):
            np_ = item[1] if item[0] == "np" else item[2]
            violations += _np_violations(np_)
    if clause.negated:
        return [Claim("unverifiable", text=text)], True, violations
    claims: list[Claim] = []
    nps = [(k, it[1]) for k, it in enumerate(clause.items) if it[0] == "np"]
    singular = [(k, n) for k, n in nps if not n.plural and not n.is_count]
    regions_only = all(it[0] == "region" for it in clause.items) and clause.items
    fronted_region = regions_only and first_in_sentence and not clause.unknown and clause.items[-1][1] is not None
    if fronted_region:
        state.pending_region = clause.items[-1][1]
        return [], True, violations  # contributes once the next noun phrase takes the region

    def subject_before(k: int) -> Mention | None:
        before = [n for kk, n in singular if kk < k]
        return before[-1].identity() if before else state.subject

    def relation_subject(k: int) -> Mention | None:
        """Nearest noun phrase before; else one after (fronted: "Below the circle is a square"); else the
        previous subject."""
        before = [n for kk, n in singular if kk < k]
        after = [n for kk, n in singular if kk > k]
        return before[-1].identity() if before else after[0].identity() if after else state.subject

    for k, np_ in nps:
        if np_.is_count:
            claims.append(Claim("count", Mention(np_.colours[0] if np_.colours else None, np_.shape,
                                                 np_.sizes[0] if np_.sizes else None), np_.number))
        elif np_.plural:
            claims.append(Claim("unverifiable", text=text))
        else:
            ident = np_.identity()
            if not np_.definite:
                claims.append(Claim("exists", ident))
                if np_.sizes and ident.size is None:
                    claims.append(Claim("size", ident, np_.sizes[0]))
            if state.pending_region is not None:
                claims.append(Claim("region", ident, state.pending_region))
                state.pending_region = None
    for k, item in enumerate(clause.items):
        if item[0] == "region":
            if item[1] is None:
                claims.append(Claim("unverifiable", text=text))
                continue
            before = [n for kk, n in singular if kk < k]
            after = [n for kk, n in singular if kk > k]
            target = (before[-1].identity() if before else after[0].identity() if after else state.subject)
            claims.append(Claim("region", target, item[1]) if target else Claim("unverifiable", text=text))
        elif item[0] == "rel":
            subject, obj = relation_subject(k), item[2]
            if subject is None or obj is None or obj.plural:
                claims.append(Claim("unverifiable", text=text))
            else:
                claims.append(Claim("relation", subject, item[1], obj.identity()))
        elif item[0] == "pred":
            subject = subject_before(k)
            claims.append(Claim(item[1], subject, item[2]) if subject else Claim("unverifiable", text=text))
    if singular:
        state.subject = singular[0][1].identity()
    only_definite_subject = len(clause.items) == 1 and singular and singular[0][1].definite and not clause.unknown
    if only_definite_subject:  # "The red circle, which is small, ...": names the subject of the next clauses
        return claims, True, violations
    if not claims and clause.content:
        claims.append(Claim("unverifiable", text=text))
    return claims, bool(claims), violations


def _sentence_is_well_formed(raw: str, n_words: int) -> bool:
    stripped = raw.strip()
    letters = [ch for ch in stripped if ch.isalpha()]
    return bool(letters) and letters[0].isupper() and stripped[-1:] in (".", "!", "?") and 3 <= n_words <= 40


def parse_caption(text: str) -> ParsedCaption:
    """Parse any string (non-strings are converted with str()). Never raises; see the module docstring."""
    return _parse_caption(text if isinstance(text, str) else str(text))


@functools.lru_cache(maxsize=65536)
def _parse_caption(text: str) -> ParsedCaption:
    claims: list[Claim] = []
    reports: list[SentenceReport] = []
    unknown_all: list[str] = []
    state = _CaptionState()
    for raw in _SENTENCE.findall(text):
        if not raw.strip():
            continue
        tokens = tokenize(raw)
        words = [t for t in tokens if t not in (",", ";", ":", ".", "!", "?")]
        if not words:
            reports.append(SentenceReport(raw.strip(), False, False, ("G2 sentence has no words",)))
            continue
        violations: list[str] = []
        for a, b in zip(words, words[1:]):
            if a == b:
                violations.append(f"G5 repeated word {a!r}")
        contributed_all = True
        sentence_claims: list[Claim] = []
        for n, clause_tokens in enumerate(_split_clauses(tokens)):
            clause = _scan_clause(clause_tokens)
            if clause.unknown:
                unknown_all += clause.unknown
                violations.append(f"G1 unknown words {sorted(set(clause.unknown))}")
            clause_claims, contributed, np_violations = _clause_claims(clause, state, " ".join(clause_tokens), n == 0)
            violations += np_violations
            sentence_claims += clause_claims
            contributed_all &= contributed
        if state.pending_region is not None:
            violations.append("G2 dangling region phrase")
            state.pending_region = None
        if not any(w in VERBS for w in words):
            violations.append("G6 sentence has no verb")
        if not contributed_all:
            violations.append("G2 fragment clause with no claim")
        if not sentence_claims:
            violations.append("G2 sentence makes no claim")
        claims += sentence_claims
        reports.append(SentenceReport(raw.strip(), not violations, _sentence_is_well_formed(raw, len(words)),
                                      tuple(dict.fromkeys(violations))))
    return ParsedCaption(tuple(claims), tuple(reports), tuple(unknown_all))
