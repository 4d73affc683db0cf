"""A synthetic routing dataset: the embedded default for demos, tests and new users.

Readable queries from six task families at three difficulties (the text says which:
templates filled with random names and numbers, gold answers computed), and a pool of
named models whose P(correct) follows a per-family skill curve over difficulty:

    logit P(correct | model m, query q) = skill[m, family] + slope[m] * (1 - difficulty) + hardness[q]

``hardness[q] ~ N(0, query_noise)`` is shared by all models (their errors correlate, as
real ones do). Specialists lead their family on easy and medium queries; the large
generalists, whose skill falls off less with difficulty, lead on hard ones or nowhere.
So the best model differs per family (and per difficulty), routing is learnable from
the text, and the oracle is far above the best single model. Larger models cost more
per token. Split: ID families ``train``/``test`` (``train_fraction``), held-out
families ``ood``. Same seed, same dataset.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from icl_router import schemas
from icl_router.config import ConfigError, GenerateConfig
from icl_router.data.dataset import Dataset, write_dataset_atomically

FAMILIES = ("arithmetic", "units", "geography", "code", "logic", "spelling")
LEVELS = ("easy", "medium", "hard")

# name: (billions of parameters, slope over difficulty, skill per family in FAMILIES order)
MODELS: dict[str, tuple[float, float, tuple[float, ...]]] = {
    "synth-math-7b": (7, 1.9, (2.2, 1.6, -1.0, 0.0, 0.2, -0.8)),
    "synth-code-7b": (7, 1.9, (0.2, -0.2, -1.0, 2.2, 0.4, -0.4)),
    "synth-trivia-13b": (13, 1.7, (-0.8, 0.2, 2.2, -1.0, -0.4, 0.4)),
    "synth-logic-8b": (8, 1.9, (0.2, -0.2, -0.6, 0.3, 2.2, -0.2)),
    "synth-general-70b": (70, 0.5, (1.0, 0.8, 1.0, 0.9, 0.9, 0.8)),
    "synth-tiny-1b": (1, 1.8, (-1.2, -1.2, -0.6, -1.4, -1.4, -0.2)),
    "synth-word-3b": (3, 1.9, (-0.8, -0.8, -0.2, -1.0, -0.8, 2.2)),
    "synth-mid-34b": (34, 0.9, (0.7, 0.5, 0.5, 0.6, 0.5, 0.4)),
}
PRICE_PER_TOKEN_PER_B = 1e-8  # dollars per token per billion parameters (70B: $0.70 per 1M tokens)


# -- query texts ---------------------------------------------------------------------

NAMES = "Ava Ben Carla Dev Elif Farid Grace Hiro Ines Jonas Kofi Lena Mateo Nadia Omar Priya Quinn Rosa Sami Tara Umar Vera Wen Xavi Yara Zoe".split()
ITEMS = "apple pencil marble cookie sticker book stamp shell card ribbon".split()
WORDS = (
    "garden planet window river candle mountain yellow silver pocket rabbit orange teacher bridge "
    "kitchen library blanket thunder village harvest lantern compass meadow journey whisper"
).split()
# country, capital, continent, river through the capital (None when there is none worth asking)
COUNTRIES = [
    ("France", "Paris", "Europe", "Seine"), ("Hungary", "Budapest", "Europe", "Danube"), ("Austria", "Vienna", "Europe", "Danube"),
    ("United Kingdom", "London", "Europe", "Thames"), ("Italy", "Rome", "Europe", "Tiber"), ("Germany", "Berlin", "Europe", "Spree"),
    ("Czechia", "Prague", "Europe", "Vltava"), ("Poland", "Warsaw", "Europe", "Vistula"), ("Portugal", "Lisbon", "Europe", "Tagus"),
    ("Egypt", "Cairo", "Africa", "Nile"), ("Iraq", "Baghdad", "Asia", "Tigris"), ("Russia", "Moscow", "Europe", "Moskva"),
    ("Spain", "Madrid", "Europe", None), ("Japan", "Tokyo", "Asia", None), ("Kenya", "Nairobi", "Africa", None),
    ("Peru", "Lima", "South America", None), ("Canada", "Ottawa", "North America", "Ottawa"), ("Australia", "Canberra", "Oceania", None),
    ("Brazil", "Brasilia", "South America", None), ("Argentina", "Buenos Aires", "South America", None), ("Mexico", "Mexico City", "North America", None),
    ("Nigeria", "Abuja", "Africa", None), ("Thailand", "Bangkok", "Asia", "Chao Phraya"), ("Vietnam", "Hanoi", "Asia", "Red River"),
    ("South Korea", "Seoul", "Asia", "Han"), ("Norway", "Oslo", "Europe", None), ("Ghana", "Accra", "Africa", None),
    ("Chile", "Santiago", "South America", None), ("New Zealand", "Wellington", "Oceania", None), ("Sudan", "Khartoum", "Africa", "Nile"),
]
RELATIONS = [("taller", "shortest", "tallest"), ("older", "youngest", "oldest"), ("faster", "slowest", "fastest")]
PETS = ["cat", "dog", "parrot", "fish", "rabbit", "turtle"]


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _arithmetic(r: random.Random, level: int) -> tuple[str, str]:
    name, other, item = r.choice(NAMES), r.choice(NAMES), r.choice(ITEMS)
    if level == 0:
        a, b = r.randint(2, 30), r.randint(2, 30)
        return f"{name} has {a} {item}s and gets {b} more from {other}. How many {item}s does {name} have now?", str(a + b)
    if level == 1:
        n, k, g = r.randint(3, 12), r.randint(4, 15), r.randint(1, 20)
        return f"{name} buys {n} packs of {item}s with {k} {item}s in each pack, then gives {g} {item}s to {other}. How many {item}s does {name} keep?", str(n * k - g)
    price, n, pct = r.randint(2, 40), r.randint(3, 9), r.choice([10, 15, 20, 25, 30])
    total = price * n * (100 - pct) / 100
    bill = (int(total) // 50 + 1) * 50
    return (
        f"A shop sells {item}s for ${price} each and gives a {pct}% discount on the whole order. {name} buys {n} {item}s, "
        f"pays with a ${bill} note and splits the change equally with {other}. How many dollars does each of them get?",
        _num((bill - total) / 2),
    )


def _units(r: random.Random, level: int) -> tuple[str, str]:
    if level == 0:
        x = r.randint(2, 95)
        big, small, f = r.choice([("kilometres", "metres", 1000), ("kilograms", "grams", 1000), ("litres", "millilitres", 1000), ("metres", "centimetres", 100)])
        return f"Convert {x} {big} to {small}.", str(x * f)
    if level == 1:
        h, m = r.randint(1, 9), r.randint(1, 59)
        return f"How many seconds are there in {h} hours and {m} minutes?", str(h * 3600 + m * 60)
    if r.random() < 0.5:
        v = r.randint(20, 180)
        return f"A train travels at {v} km/h. What is its speed in metres per second, rounded to two decimal places?", f"{v / 3.6:.2f}"
    f = r.randint(-20, 110)
    return f"A thermometer reads {f} degrees Fahrenheit. What is the temperature in degrees Celsius, rounded to one decimal place?", f"{(f - 32) * 5 / 9:.1f}"


def _geography(r: random.Random, level: int) -> tuple[str, str]:
    country, capital, continent, river = r.choice(COUNTRIES if level < 2 else [c for c in COUNTRIES if c[3]])
    lead = r.choice([f"{r.choice(NAMES)} is planning a trip.", f"{r.choice(NAMES)} is studying a map.", "Geography quiz:", f"{r.choice(NAMES)} asks a question."])
    if level == 0:
        return f"{lead} What is the capital city of {country}?", capital
    if level == 1:
        if r.random() < 0.5:
            return f"{lead} {capital} is the capital of which country?", country
        return f"{lead} On which continent is the country whose capital is {capital}?", continent
    return f"{lead} Which river flows through {capital}, the capital of {country}?", river


def _code(r: random.Random, level: int) -> tuple[str, str]:
    if level == 0:
        word = r.choice(WORDS)
        a, b = r.randint(2, 9), r.randint(2, 9)
        return f"What does this Python line print?\nprint(len('{word}') + {a} * {b})", str(len(word) + a * b)
    if level == 1:
        s, n, k = r.randint(0, 10), r.randint(3, 8), r.randint(2, 5)
        return f"What is the value of total after this Python code runs?\ntotal = {s}\nfor i in range({n}):\n    total += i * {k}", str(s + k * n * (n - 1) // 2)
    n, base, m, c = r.randint(3, 6), r.randint(1, 3), r.randint(2, 3), r.randint(-2, 4)
    value = base
    for _ in range(n - 1):
        value = value * m + c
    code = f"def f(n):\n    if n <= 1:\n        return {base}\n    return f(n - 1) * {m} + {c}"
    return f"What does f({n}) return for this recursive Python function?\n{code}", str(value)


def _logic(r: random.Random, level: int) -> tuple[str, str]:
    if level < 2:
        people = r.sample(NAMES, 3 + level)  # ordered from most to least
        more, least, most = r.choice(RELATIONS)
        clues = [f"{a} is {more} than {b}." for a, b in zip(people, people[1:])]
        r.shuffle(clues)
        ask_least = r.random() < 0.5
        return f"{' '.join(clues)} Who is the {least if ask_least else most}?", people[-1] if ask_least else people[0]
    people, pets = r.sample(NAMES, 3), r.sample(PETS, 3)  # people[i] owns pets[i]
    clues = [f"{people[0]} owns the {pets[0]}.", f"{people[1]} does not own the {pets[2]}."]
    r.shuffle(clues)
    return f"{', '.join(people[:2])} and {people[2]} each own a different pet: a {pets[0]}, a {pets[1]} and a {pets[2]}. {' '.join(clues)} Who owns the {pets[2]}?", people[2]


def _spelling(r: random.Random, level: int) -> tuple[str, str]:
    if level == 0:
        word = r.choice(WORDS)
        return f"How many letters are in the word '{word}'? ({r.choice(NAMES)} is counting.)", str(len(word))
    if level == 1:
        word = r.choice(WORDS)
        return f"{r.choice(NAMES)} wants a word puzzle: write the word '{word}' backwards.", word[::-1]
    words = r.sample(WORDS, 3)
    letter = r.choice("".join(words))
    return f"How many times does the letter '{letter}' appear in the phrase '{' '.join(words)}'?", str("".join(words).count(letter))


TEMPLATES = {"arithmetic": _arithmetic, "units": _units, "geography": _geography, "code": _code, "logic": _logic, "spelling": _spelling}


# -- the dataset ------------------------------------------------------------------------


def check_pool(cfg: GenerateConfig) -> list[str]:
    """The families ``cfg`` asks for, checked against the generator's tables (ConfigError names the key)."""
    families = cfg.families if cfg.families is not None else list(FAMILIES)
    if cfg.n_models > len(MODELS):
        raise ConfigError(f"generate.n_models must be between 1 and {len(MODELS)} (the synthetic pool), got {cfg.n_models}")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ConfigError(f"generate.families {sorted(unknown)} do not exist; choose from {list(FAMILIES)}")
    if not set(cfg.ood_families) <= set(families):
        raise ConfigError(f"generate.ood_families must be a subset of the families {families}")
    if not set(families) - set(cfg.ood_families):
        raise ConfigError("generate: at least one family must be in-distribution (not in ood_families)")
    return families


def generate_tables(cfg: GenerateConfig) -> tuple[pa.Table, pa.Table]:
    """(queries, outcomes) in the dataset contract; pure function of ``cfg``."""
    families = check_pool(cfg)
    r, rng = random.Random(cfg.seed), np.random.default_rng(cfg.seed)
    family_idx = rng.integers(0, len(families), cfg.n_queries)
    level = rng.integers(0, len(LEVELS), cfg.n_queries)
    texts, golds, seen = [], [], set()
    for f, lv in zip(family_idx, level):
        for _ in range(50):  # templates are wide; a repeated text is rare, draw again
            text, gold = TEMPLATES[families[f]](r, int(lv))
            if text not in seen:
                break
        seen.add(text)
        texts.append(text)
        golds.append(gold)
    family = np.array(families)[family_idx]
    is_ood = np.isin(family, cfg.ood_families)
    split = np.where(is_ood, "ood", "test").astype(object)
    id_pos = rng.permutation(np.flatnonzero(~is_ood))
    split[id_pos[: int(cfg.train_fraction * len(id_pos))]] = "train"
    ids = [f"synth-{i:05d}" for i in range(cfg.n_queries)]
    numeric = {"arithmetic", "units", "code"}
    queries = pa.table(
        {
            schemas.QUERY_ID: ids,
            schemas.TEXT: texts,
            schemas.TASK: family.tolist(),
            schemas.SPLIT: split.tolist(),
            schemas.GOLD: golds,
            schemas.GRADER: ["gsm8k" if f in numeric else "exact_match" for f in family],  # graders registered in icl_router.graders
            schemas.METRIC: [f"synthetic-{LEVELS[lv]}" for lv in level],
        },
        schema=schemas.QUERIES_SCHEMA,
    )

    names = list(MODELS)[: cfg.n_models]
    size = np.array([MODELS[m][0] for m in names])  # [M]
    slope = np.array([MODELS[m][1] for m in names])  # [M]
    skill = np.array([[MODELS[m][2][FAMILIES.index(f)] for f in families] for m in names])  # [M, F]
    hardness = rng.normal(0.0, cfg.query_noise, cfg.n_queries)  # [Q]
    logit = skill[:, family_idx] + slope[:, None] * (1 - level)[None, :] + hardness[None, :]  # [M, Q]
    correct = rng.random(logit.shape) < 1 / (1 + np.exp(-logit))  # [M, Q]
    prompt_tokens = np.array([len(t.split()) * 4 // 3 + 8 for t in texts])  # [Q]
    # harder queries and smaller models ramble longer
    completion = rng.poisson(30 * (1 + level)[None, :] * (1 + 5 / (size[:, None] + 5)))  # [M, Q]
    cost = (prompt_tokens[None, :] + completion) * size[:, None] * PRICE_PER_TOKEN_PER_B  # [M, Q]
    outcomes = pa.table(
        {
            schemas.QUERY_ID: ids * len(names),
            schemas.MODEL_ID: np.repeat(names, cfg.n_queries).tolist(),
            schemas.SAMPLE: pa.array(np.zeros(len(names) * cfg.n_queries), pa.int32()),
            schemas.SCORE: correct.ravel().astype(np.float64),
            schemas.CORRECT: correct.ravel(),
            schemas.COST: cost.ravel(),
            schemas.PROMPT_TOKENS: np.tile(prompt_tokens, len(names)),
            schemas.COMPLETION_TOKENS: completion.ravel(),
        }
    )
    return queries, outcomes


def generate_dataset(output: str | Path, cfg: GenerateConfig, *, overwrite: bool = False) -> Dataset:
    queries, outcomes = generate_tables(cfg)
    return write_dataset_atomically(output, queries, outcomes, overwrite=overwrite)
