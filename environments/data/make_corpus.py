"""Generates ``corpus.jsonl``: a small encyclopedia of FICTIONAL countries, towns, people and companies.

Every name is made up from syllables, so a model cannot answer RetrievalQA questions from prior knowledge;
it has to search and read. Look-alike names (shared company brands, shared surnames, towns with one root)
and extra facts (a person "later moved to" a town, a company's second workshop) are deliberate
distractors. Each record holds ``id``, ``title``, ``text`` (what the tools show) and ``facts`` (the
structured relations the task generator uses; never shown to the model).

Deterministic: ``python environments/data/make_corpus.py`` rewrites the same file byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SEED = 20250611
N_COUNTRIES, N_RIVERS, N_TOWN_ROOTS, N_TOWNS = 6, 12, 24, 30
N_BRANDS, N_COMPANIES, N_PEOPLE, N_SURNAMES = 18, 28, 38, 26

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "sk", "st", "t",
          "th", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "y", "ei"]
CODAS = ["n", "r", "l", "s", "m", "sk", "nd", "th", "v", "x"]
TOWN_SUFFIXES = ["holm", "vik", "stad", "mere", "dal", "by", "wick", "ford"]
COUNTRY_SUFFIXES = ["ia", "ora", "esh", "and", "avia", "ost"]
INDUSTRIES: dict[str, tuple[str, list[str]]] = {  # name word -> (adjective, possible main products)
    "Textiles": ("textile", ["wool blankets", "linen shirts", "felt hats"]),
    "Ceramics": ("ceramics", ["glazed tiles", "stoneware jugs", "porcelain cups"]),
    "Optics": ("optics", ["brass telescopes", "reading glasses", "camera lenses"]),
    "Foundry": ("metalworking", ["cast iron stoves", "bronze bells", "copper kettles"]),
    "Shipping": ("shipping", ["cargo barges", "ferry services", "river tugboats"]),
    "Instruments": ("instrument", ["concert violins", "pipe organs", "tin whistles"]),
    "Robotics": ("robotics", ["warehouse robots", "robotic arms", "delivery drones"]),
    "Breweries": ("brewing", ["dark ale", "barley lager", "pear cider"]),
    "Mills": ("milling", ["rye flour", "oat flakes", "paper sheets"]),
    "Printing": ("printing", ["road maps", "playing cards", "almanacs"]),
}
PROFESSIONS = ["engineer", "weaver", "chemist", "glassblower", "shipwright", "botanist", "architect",
               "cartographer", "clockmaker", "merchant", "potter", "surveyor"]
FEATURES = ["stone bridges", "spring fair", "salt mines", "glass market", "clock tower", "horse races",
            "apple orchards", "old lighthouse"]


class NameMaker:
    """Random pronounceable names, never reusing one (case-insensitive) across all categories."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def make(self, syllables: int, suffix: str = "") -> str:
        while True:
            parts = [self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(syllables)]
            name = ("".join(parts) + (suffix or self.rng.choice(CODAS))).capitalize()
            if name.lower() not in self.used and 4 <= len(name) <= 11:
                self.used.add(name.lower())
                return name


def build_corpus(seed: int = SEED) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    names = NameMaker(rng)
    countries = [names.make(2, rng.choice(COUNTRY_SUFFIXES)) for _ in range(N_COUNTRIES)]
    rivers = [names.make(2) for _ in range(N_RIVERS)]
    roots = [names.make(1) for _ in range(N_TOWN_ROOTS)]
    # Some roots get two towns ("Kelvik" and "Kelstad"): look-alike distractors.
    town_roots = roots + rng.sample(roots, N_TOWNS - N_TOWN_ROOTS)
    towns: list[str] = []
    for root in town_roots:
        suffix = rng.choice([s for s in TOWN_SUFFIXES if root + s not in towns])
        towns.append(root + suffix)
        names.used.add((root + suffix).lower())
    brands = [names.make(rng.choice([2, 3])) for _ in range(N_BRANDS)]
    company_brands = brands + rng.sample(brands, N_COMPANIES - N_BRANDS)  # shared brands: distractors
    surnames = [names.make(2) for _ in range(N_SURNAMES)]
    person_surnames = surnames + [rng.choice(surnames) for _ in range(N_PEOPLE - N_SURNAMES)]
    first_names = [names.make(rng.choice([1, 2]), rng.choice(["na", "ro", "la", "tin", "mar", "del", "ric", "sa"]))
                   for _ in range(N_PEOPLE)]

    ents: list[dict[str, Any]] = []  # entities with internal keys; doc ids are assigned after shuffling

    def add(kind: str, title: str, **facts: Any) -> int:
        ents.append({"kind": kind, "title": title, **facts})
        return len(ents) - 1

    country_ix = [add("country", c, feature=rng.choice(FEATURES)) for c in countries]
    town_ix = []
    for i, town in enumerate(towns):
        country = country_ix[i % N_COUNTRIES]  # every country gets at least one town
        town_ix.append(add("town", town, country=country, river=rng.choice(rivers),
                           founded=rng.randint(1100, 1699), feature=rng.choice(FEATURES + [None] * 4)))
    for c in country_ix:
        ents[c]["capital"] = rng.choice([t for t in town_ix if ents[t]["country"] == c])

    industries = list(INDUSTRIES)
    company_ix = []
    for brand in company_brands:
        taken = {ents[c]["title"] for c in company_ix}
        industry = rng.choice([w for w in industries if f"{brand} {w}" not in taken])
        hq = rng.choice(town_ix)
        company_ix.append(add(
            "company", f"{brand} {industry}", industry=industry, hq=hq, founded=rng.randint(1850, 1999),
            product=rng.choice(INDUSTRIES[industry][1]),
            workshop=rng.choice([t for t in town_ix if t != hq]) if rng.random() < 0.5 else None,
        ))

    person_ix = []
    for i in range(N_PEOPLE):
        born_in = rng.choice(town_ix)
        founded = company_ix[i] if i < N_COMPANIES else None  # the first N_COMPANIES people are founders
        birth_year = (ents[founded]["founded"] - rng.randint(25, 45)) if founded is not None else rng.randint(
            1800, 1960)
        # Non-founders always get an employer: a second sentence, and a "company" distractor.
        employed = founded is None or rng.random() < 0.5
        worked_at = rng.choice([c for c in company_ix if c != founded]) if employed else None
        person_ix.append(add(
            "person", f"{first_names[i]} {person_surnames[i]}", born_in=born_in, birth_year=birth_year,
            founded=founded, profession=rng.choice(PROFESSIONS), pronoun=rng.choice(["She", "He"]),
            moved_to=rng.choice([t for t in town_ix if t != born_in]) if rng.random() < 0.4 else None,
            worked_at=worked_at,
        ))
        if founded is not None:
            ents[founded]["founder"] = person_ix[-1]

    order = list(range(len(ents)))
    rng.shuffle(order)  # ids carry no hint of an entity's kind
    doc_id = {ent: f"doc{pos:03d}" for pos, ent in enumerate(order)}
    return [_record(ents, e, doc_id) for e in sorted(order, key=lambda e: doc_id[e])]


def _record(ents: list[dict[str, Any]], e: int, doc_id: dict[int, str]) -> dict[str, Any]:
    x = ents[e]
    title = x["title"]

    def name(i: int) -> str:
        return ents[i]["title"]

    if x["kind"] == "country":
        text = f"{title} is a country whose capital is {name(x['capital'])}. It is known for its {x['feature']}."
        facts = {"kind": "country"}
    elif x["kind"] == "town":
        text = (f"{title} is a town in {name(x['country'])}. The river {x['river']} flows through {title}. "
                f"It was founded in {x['founded']}.")
        if x["feature"]:
            text += f" Visitors come for its {x['feature']}."
        facts = {"kind": "town", "country": doc_id[x["country"]], "river": x["river"], "year": x["founded"]}
    elif x["kind"] == "company":
        adjective = INDUSTRIES[x["industry"]][0]
        text = (f"{title} is {_a(adjective)} company headquartered in {name(x['hq'])}. It was founded in "
                f"{x['founded']} by {name(x['founder'])}. Its main product is {x['product']}.")
        if x["workshop"] is not None:
            text += f" It also runs a workshop in {name(x['workshop'])}."
        facts = {"kind": "company", "founder": doc_id[x["founder"]], "hq": doc_id[x["hq"]],
                 "product": x["product"], "year": x["founded"]}
    else:
        pron = x["pronoun"]
        text = f"{title} was {_a(x['profession'])} born in {name(x['born_in'])} in {x['birth_year']}."
        if x["moved_to"] is not None:
            text += f" {pron} later moved to {name(x['moved_to'])}."
        if x["worked_at"] is not None:
            text += f" {pron} worked for some years at {name(x['worked_at'])}."
        if x["founded"] is not None:
            text += f" {pron} founded {name(x['founded'])}."
        facts = {"kind": "person", "born_in": doc_id[x["born_in"]],
                 "company": doc_id[x["founded"]] if x["founded"] is not None else None}
    return {"id": doc_id[e], "title": title, "text": text, "facts": facts}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def write_corpus(path: Path, seed: int = SEED) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in build_corpus(seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    out = Path(__file__).with_name("corpus.jsonl")
    write_corpus(out)
    print(f"wrote {out}")
