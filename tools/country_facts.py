"""The old knowledge of the continual-learning study on SmolLM2 (tools/continual_smollm2.py): cloze items about
countries ("The capital of <country> is" -> " <capital>", the reverse, the continent, the first official language)
built from the JSON records of the ``countryinfo`` package, read as data without importing it."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path


def countries() -> list[dict]:
    """Country records (name, capital, region, subregion) from the ``countryinfo`` package's JSON files, read
    without importing the package."""
    try:
        files = metadata.distribution("countryinfo").files or []
    except metadata.PackageNotFoundError:
        raise SystemExit("the cloze set needs the countryinfo package's data: pip install --no-deps countryinfo") from None
    out = {}
    for f in files:
        if str(f).endswith(".json"):
            data = json.loads(Path(f.locate()).read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("name"):
                out[str(data["name"])] = data
    return [out[name] for name in sorted(out)]


def continent(record: dict) -> str | None:
    """The continent as English prose names it (the Americas split into North and South America)."""
    region, sub = record.get("region") or "", record.get("subregion") or ""
    if region == "Americas":
        return "South America" if sub == "South America" else "North America"
    return region or None


#: ISO 639-1 codes of the languages named in the ``language`` relation (a country's first listed language)
LANGUAGES = {"ar": "Arabic", "bn": "Bengali", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
             "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian",
             "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
             "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "th": "Thai", "tr": "Turkish",
             "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese", "cs": "Czech", "da": "Danish", "id": "Indonesian"}


def language(record: dict) -> str | None:
    codes = record.get("languages") or []
    return LANGUAGES.get(codes[0]) if codes else None


#: relation -> (prompt, answer) of a country record; items whose field is missing are left out
RELATIONS = {
    "capital": lambda r: (f"The capital of {r['name']} is", r.get("capital")),
    "capital_of": lambda r: (f"{r.get('capital')} is the capital of", r["name"]),
    "continent": lambda r: (f"{r['name']} is a country in", continent(r)),
    "language": lambda r: (f"The official language of {r['name']} is", language(record=r)),
}


def cloze_items() -> list[dict]:
    """Every candidate cloze item: ``{relation, context, answer}`` (the answer with its leading space)."""
    items = []
    for record in countries():
        for relation, make in RELATIONS.items():
            prompt, answer = make(record)
            if answer and record.get("capital"):
                items.append({"relation": relation, "context": prompt, "answer": f" {answer}"})
    return items
