"""The demo's generated task: text normalization for speech (numbers, dates, money... in words).

Sentences with numbers, decimals, dates, times, money, units, percentages and ordinals, to be
written out as spoken words. It looks like real work (TTS front ends do exactly this), every
answer is checkable by exact match, and it needs a real model: the spoken form of "3.05 kg" or
"12/03/2024" depends on digits, position, plurality and context. The spoken-form converter is
written here for the bounded ranges the generator emits, so the demo needs no extra dependency.
"""
from __future__ import annotations

import json
import os
import random

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]


def cardinal(n: int) -> str:
    """0 <= n < 1,000,000 in British English words: 2305 -> 'two thousand three hundred and five'."""
    assert 0 <= n < 1_000_000, n
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" and " + cardinal(rest) if rest else "")
    rest = n % 1000
    head = cardinal(n // 1000) + " thousand"
    if not rest:
        return head
    return head + (" and " if rest < 100 else " ") + cardinal(rest)


def ordinal(n: int) -> str:
    """1 -> 'first', 21 -> 'twenty-first', 40 -> 'fortieth'."""
    words = cardinal(n)
    head, sep, last = max((words.rpartition(s) for s in (" ", "-")), key=lambda p: len(p[0]))
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def ordinal_suffix(n: int) -> str:
    """The written ordinal: 1 -> '1st', 12 -> '12th', 23 -> '23rd'."""
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}" + {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def year(y: int) -> str:
    """1987 -> 'nineteen eighty-seven', 2005 -> 'two thousand and five', 2024 -> 'twenty twenty-four'."""
    if 2000 <= y <= 2009:
        return cardinal(y)
    hi, lo = divmod(y, 100)
    return cardinal(hi) + " " + ("hundred" if lo == 0 else "oh " + _ONES[lo] if lo < 10 else cardinal(lo))


def decimal(text: str) -> str:
    """'3.05' -> 'three point zero five' (digits after the point are read one by one)."""
    whole, _, frac = text.partition(".")
    out = cardinal(int(whole))
    return out + " point " + " ".join(_ONES[int(d)] for d in frac) if frac else out


def clock(h: int, m: int) -> str:
    """24-hour times: 09:00 -> 'nine o'clock', 09:05 -> 'nine oh five', 14:30 -> 'fourteen thirty'."""
    if m == 0:
        return cardinal(h) + " o'clock"
    return cardinal(h) + " " + ("oh " + _ONES[m] if m < 10 else cardinal(m))


# Units: written symbol -> (singular, plural). Exactly 1 takes the singular ("1 kg" is one kilogram,
# "1.5 kg" is one point five kilograms), which the model must learn from the digits.
_UNITS = {"kg": ("kilogram", "kilograms"), "g": ("gram", "grams"), "km": ("kilometre", "kilometres"),
          "m": ("metre", "metres"), "cm": ("centimetre", "centimetres"), "ml": ("millilitre", "millilitres"),
          "l": ("litre", "litres"), "km/h": ("kilometre per hour", "kilometres per hour"),
          "°C": ("degree Celsius", "degrees Celsius"), "%": ("percent", "percent")}
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
               "£": ("pound", "pounds", "penny", "pence")}


def _quantity(rng: random.Random) -> str:
    """A number as written before a unit: an integer or a decimal with one place."""
    kind = rng.random()
    if kind < 0.15:
        return "1"
    if kind < 0.55:
        return str(rng.randint(2, 999))
    return f"{rng.randint(0, 99)}.{rng.randint(0, 9)}"


def _measure(rng: random.Random, units: tuple[str, ...]) -> tuple[str, str]:
    q, unit = _quantity(rng), rng.choice(units)
    singular, plural = _UNITS[unit]
    spoken = decimal(q) + " " + (singular if q == "1" else plural)
    return (q + unit if unit in ("%", "°C") else f"{q} {unit}"), spoken


def _money(rng: random.Random) -> tuple[str, str]:
    sym = rng.choice(list(_CURRENCIES))
    one, many, sub_one, sub_many = _CURRENCIES[sym]
    whole = rng.choice([1, rng.randint(2, 99), rng.randint(100, 999)])
    if rng.random() < 0.4:
        return f"{sym}{whole}", cardinal(whole) + " " + (one if whole == 1 else many)
    cents = rng.randint(1, 99)
    spoken = (cardinal(whole) + " " + (one if whole == 1 else many) + " and "
              + cardinal(cents) + " " + (sub_one if cents == 1 else sub_many))
    return f"{sym}{whole}.{cents:02d}", spoken


def _date(rng: random.Random) -> tuple[str, str]:
    d, mth, y = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1950, 2039)
    return f"{d:02d}/{mth:02d}/{y}", f"the {ordinal(d)} of {_MONTHS[mth - 1]} {year(y)}"


def _time(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randint(0, 23), rng.choice([0, 15, 30, 45, rng.randint(1, 59)])
    return f"{h:02d}:{m:02d}", clock(h, m)


def _count(rng: random.Random) -> tuple[str, str]:
    n = rng.choice([rng.randint(2, 99), rng.randint(100, 999)])
    return str(n), cardinal(n)


def _ord(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 99)
    return ordinal_suffix(n), ordinal(n)


_SLOTS = {
    "weight": lambda r: _measure(r, ("kg", "g")), "length": lambda r: _measure(r, ("km", "m", "cm")),
    "volume": lambda r: _measure(r, ("ml", "l")), "speed": lambda r: _measure(r, ("km/h",)),
    "temp": lambda r: _measure(r, ("°C",)), "pct": lambda r: _measure(r, ("%",)),
    "money": _money, "date": _date, "time": _time, "count": _count, "ord": _ord,
}
_TEMPLATES = [
    "The parcel weighs {weight} and ships on {date}.",
    "Your order of {count} items costs {money} in total.",
    "The train to Leeds leaves at {time} from platform {count}.",
    "She finished {ord} after running {length}.",
    "Mix {volume} of water with {weight} of flour.",
    "On {date} the temperature reached {temp}.",
    "Prices rose by {pct} in the {ord} week of trading.",
    "The meeting on {date} starts at {time}.",
    "The car was doing {speed} when it passed the {ord} marker.",
    "We paid {money} for {weight} of coffee.",
    "The hike covers {length} and takes about {count} minutes.",
    "Doors open at {time} and tickets cost {money}.",
    "The tank holds {volume} and was refilled on {date}.",
    "Sales fell {pct} after the {ord} price change.",
    "Room {count} was booked for {date} at {money} per night.",
    "At {time} the reactor was at {temp}.",
]
_SLOT_NAMES = sorted(_SLOTS)


def _draw(rng: random.Random) -> tuple[str, dict[str, tuple[str, str]]]:
    """A template and its slots' (written, spoken) values, drawn from `rng`."""
    template = rng.choice(_TEMPLATES)
    values = {}
    for name in _SLOT_NAMES:  # a fixed order keeps the draw sequence independent of dict order
        if "{" + name + "}" in template:
            values[name] = _SLOTS[name](rng)
    return template, values


def make_example(rng: random.Random) -> dict:
    """One sentence and its spoken form, drawn from `rng`."""
    template, values = _draw(rng)
    source = template.format(**{k: v[0] for k, v in values.items()})
    target = template.format(**{k: v[1] for k, v in values.items()})
    return {"source": source, "target": target}


# ---- noisy references ---------------------------------------------------------------------------
# Real references are inconsistent: annotators leave a figure unnormalised, write another valid
# form, or slip on a word. A noisy reference differs from the clean one in one slot, in one of:
NOISE_KINDS = ("unnormalised", "no_and", "slip")
_NUMBER_WORDS = _ONES[1:] + _TENS[2:] + ["hundred", "thousand"]


def _no_and(spoken: str) -> str | None:
    """The American form without "and" ("one hundred and five" -> "one hundred five"), if any."""
    out = spoken.replace(" hundred and ", " hundred ").replace(" thousand and ", " thousand ")
    return out if out != spoken else None


def _slip(spoken: str, rng: random.Random) -> str | None:
    """One number word replaced by another ("seventeen" -> "seventy"), if the slot has one."""
    words = spoken.replace("-", " - ").split(" ")
    spots = [i for i, w in enumerate(words) if w in _NUMBER_WORDS]
    if not spots:
        return None
    i = rng.choice(spots)
    words[i] = rng.choice([w for w in _NUMBER_WORDS if w != words[i]])
    return " ".join(words).replace(" - ", "-")


def noisy_target(source_row: dict, rng: random.Random) -> dict:
    """The row with one slot of its reference corrupted (see NOISE_KINDS); `source_row` must come
    from make_noisable_example."""
    template, values = source_row["_template"], dict(source_row["_values"])
    name = rng.choice(sorted(values))
    written, spoken = values[name]
    options = {"unnormalised": written, "no_and": _no_and(spoken), "slip": _slip(spoken, rng)}
    kind = rng.choice([k for k in NOISE_KINDS if options[k] is not None])
    values[name] = (written, options[kind])
    return {"source": source_row["source"], "target": template.format(**{k: v[1] for k, v in values.items()}),
            "noise": kind}


def make_noisable_example(rng: random.Random) -> dict:
    """make_example plus what noisy_target needs (keys starting with _ are not written)."""
    template, values = _draw(rng)
    return {"source": template.format(**{k: v[0] for k, v in values.items()}),
            "target": template.format(**{k: v[1] for k, v in values.items()}),
            "_template": template, "_values": values}


def make_task(out_dir: str, *, seed: int = 0, n_train: int = 20000, n_validation: int = 200,
              n_test: int = 500, noise: float = 0.0) -> dict:
    """Write train/validation/test.jsonl ({"source", "target"} per line) to `out_dir`.

    Deterministic from `seed`. No source sentence appears twice in or across the splits, so the
    test split measures generalisation, not recall. With `noise` > 0 that share of the train and
    validation references is corrupted in one slot (noisy_target; drawn from a second random
    stream, so the sources and the clean references are the same as without noise); test
    references stay clean: the test measures the task, not the annotators. Returns {split: path}.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise {noise} is outside [0, 1)")
    rng = random.Random(seed)
    noise_rng = random.Random(f"noise-{seed}")
    seen: set[str] = set()
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        rows = []
        while len(rows) < n:
            ex = make_noisable_example(rng)
            if ex["source"] in seen:
                continue
            seen.add(ex["source"])
            if split != "test" and noise_rng.random() < noise:
                ex = noisy_target(ex, noise_rng)
            rows.append({"source": ex["source"], "target": ex["target"]})
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return paths
