"""Language registry: ISO codes, English names, FLORES-200 codes and X-ALMA's language groups.

This module imports nothing from datm: every other stage may depend on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from datm.errors import DatmError

ENGLISH = "en"


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1 as used by ALMA/X-ALMA file names
    name: str  # English name, as it appears in ALMA prompts
    flores: str  # FLORES-200 code


_TABLE: list[tuple[str, str, str]] = [
    ("en", "English", "eng_Latn"),
    # X-ALMA group 1
    ("da", "Danish", "dan_Latn"),
    ("nl", "Dutch", "nld_Latn"),
    ("de", "German", "deu_Latn"),
    ("is", "Icelandic", "isl_Latn"),
    ("no", "Norwegian", "nob_Latn"),
    ("sv", "Swedish", "swe_Latn"),
    ("af", "Afrikaans", "afr_Latn"),
    # group 2
    ("ca", "Catalan", "cat_Latn"),
    ("ro", "Romanian", "ron_Latn"),
    ("gl", "Galician", "glg_Latn"),
    ("it", "Italian", "ita_Latn"),
    ("pt", "Portuguese", "por_Latn"),
    ("es", "Spanish", "spa_Latn"),
    # group 3
    ("bg", "Bulgarian", "bul_Cyrl"),
    ("mk", "Macedonian", "mkd_Cyrl"),
    ("sr", "Serbian", "srp_Cyrl"),
    ("uk", "Ukrainian", "ukr_Cyrl"),
    ("ru", "Russian", "rus_Cyrl"),
    # group 4
    ("id", "Indonesian", "ind_Latn"),
    ("ms", "Malay", "zsm_Latn"),
    ("th", "Thai", "tha_Thai"),
    ("vi", "Vietnamese", "vie_Latn"),
    ("mg", "Malagasy", "plt_Latn"),
    ("fr", "French", "fra_Latn"),
    # group 5
    ("hu", "Hungarian", "hun_Latn"),
    ("el", "Greek", "ell_Grek"),
    ("cs", "Czech", "ces_Latn"),
    ("pl", "Polish", "pol_Latn"),
    ("lt", "Lithuanian", "lit_Latn"),
    ("lv", "Latvian", "lvs_Latn"),
    # group 6
    ("ka", "Georgian", "kat_Geor"),
    ("zh", "Chinese", "zho_Hans"),
    ("ja", "Japanese", "jpn_Jpan"),
    ("ko", "Korean", "kor_Hang"),
    ("fi", "Finnish", "fin_Latn"),
    ("et", "Estonian", "est_Latn"),
    # group 7
    ("gu", "Gujarati", "guj_Gujr"),
    ("hi", "Hindi", "hin_Deva"),
    ("mr", "Marathi", "mar_Deva"),
    ("ne", "Nepali", "npi_Deva"),
    ("ur", "Urdu", "urd_Arab"),
    # group 8
    ("az", "Azerbaijani", "azj_Latn"),
    ("kk", "Kazakh", "kaz_Cyrl"),
    ("ky", "Kyrgyz", "kir_Cyrl"),
    ("tr", "Turkish", "tur_Latn"),
    ("uz", "Uzbek", "uzn_Latn"),
    ("ar", "Arabic", "arb_Arab"),
    ("he", "Hebrew", "heb_Hebr"),
    ("fa", "Persian", "pes_Arab"),
]

LANGUAGES: dict[str, Language] = {code: Language(code, name, flores) for code, name, flores in _TABLE}

# X-ALMA (Xu et al., 2025) groups its 50 languages (English included) into 8 groups; English is
# shared by all of them, so groups list only the non-English members.
XALMA_GROUPS: dict[str, list[str]] = {
    "group1": ["da", "nl", "de", "is", "no", "sv", "af"],
    "group2": ["ca", "ro", "gl", "it", "pt", "es"],
    "group3": ["bg", "mk", "sr", "uk", "ru"],
    "group4": ["id", "ms", "th", "vi", "mg", "fr"],
    "group5": ["hu", "el", "cs", "pl", "lt", "lv"],
    "group6": ["ka", "zh", "ja", "ko", "fi", "et"],
    "group7": ["gu", "hi", "mr", "ne", "ur"],
    "group8": ["az", "kk", "ky", "tr", "uz", "ar", "he", "fa"],
}


# The two families of English-centric directions whose asymmetry the paper studies, in the order
# tables and plots show them (XX→En first), and their display names.
XX_EN, EN_XX = "xx-en", "en-xx"
FAMILIES: tuple[str, ...] = (XX_EN, EN_XX)
FAMILY_NAMES: dict[str, str] = {XX_EN: "XX→En", EN_XX: "En→XX"}


class LanguageError(DatmError):
    """A language, direction or group that datm cannot use."""


class UnknownLanguageError(LanguageError):
    pass


def get(code: str) -> Language:
    try:
        return LANGUAGES[code]
    except KeyError:
        known = ", ".join(sorted(LANGUAGES))
        raise UnknownLanguageError(f"unknown language code {code!r}; known codes: {known}") from None


def name(code: str) -> str:
    return get(code).name


@dataclass(frozen=True, order=True)
class Direction:
    src: str
    tgt: str

    def __str__(self) -> str:
        return f"{self.src}-{self.tgt}"

    @classmethod
    def parse(cls, text: str) -> Direction:
        parts = text.split("-")
        if len(parts) != 2 or not all(parts):
            raise LanguageError(f"direction {text!r} is not of the form SRC-TGT (e.g. de-en)")
        get(parts[0])
        get(parts[1])
        return cls(parts[0], parts[1])

    @property
    def to_english(self) -> bool:
        return self.tgt == ENGLISH

    @property
    def family(self) -> str:
        """XX_EN ('xx-en') or EN_XX ('en-xx'): see FAMILIES."""
        return XX_EN if self.to_english else EN_XX

    @property
    def foreign(self) -> str:
        return self.src if self.to_english else self.tgt


def by_family(directions: Iterable[str]) -> dict[str, list[str]]:
    """Directions ("de-en", ...) per family, in FAMILIES order and their given order; families with no
    direction are left out."""
    directions = list(directions)
    out = {f: [d for d in directions if Direction.parse(d).family == f] for f in FAMILIES}
    return {f: ds for f, ds in out.items() if ds}


def directions_for(languages: list[str]) -> list[Direction]:
    """All English-centric directions for the given non-English languages, XX→En first."""
    return [Direction(x, ENGLISH) for x in languages] + [Direction(ENGLISH, x) for x in languages]


def resolve_groups(languages: list[str], groups: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """Groups restricted to `languages`; every language must fall in exactly one group.

    With no explicit groups, X-ALMA's grouping is used (empty groups dropped).
    """
    for code in languages:
        get(code)
        if code == ENGLISH:
            raise LanguageError("'languages' lists the non-English languages; English is always the pivot")
    if groups is None:
        chosen = {g: [x for x in members if x in languages] for g, members in XALMA_GROUPS.items()}
        chosen = {g: m for g, m in chosen.items() if m}
        missing = [x for x in languages if not any(x in m for m in chosen.values())]
        if missing:
            raise LanguageError(f"languages {missing} are in no X-ALMA group; give 'groups' in the config")
        return chosen
    seen: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for g, members in groups.items():
        for x in members:
            get(x)
            if x not in languages:
                raise LanguageError(f"groups.{g} lists {x!r}, which is not in 'languages' {languages}")
            if x in seen:
                raise LanguageError(f"language {x!r} is in two groups: {seen[x]!r} and {g!r}")
            seen[x] = g
        out[g] = list(members)
    missing = [x for x in languages if x not in seen]
    if missing:
        raise LanguageError(f"languages {missing} are in no group; add them to 'groups'")
    return out


def bleu_tokenizer(code: str) -> str:
    """sacrebleu's default tokenizer for a target language."""
    return {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}.get(code, "13a")
