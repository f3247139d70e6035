"""Regenerate the shipped ``sft_kernels/data/sft_tiny.jsonl`` (deterministic).

    python -m sft_kernels.train.tiny_dataset [PATH]

Short templated tasks a small model learns within a couple of CPU minutes: the prompt
format and answer shapes are learnt first (most of the perplexity drop), the rules
(arithmetic, reversal, lookup) later. Every line is ``{"prompt": ..., "response": ...}``
in the DeepSpeed-Chat step-1 form ``"Human: <question>\\nAssistant:"`` / ``" <answer>"``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Dict, List

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran",
    "Australia": "Canberra", "Argentina": "Buenos Aires", "Cuba": "Havana", "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
}
WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "garden", "window", "rocket", "silver",
    "planet", "candle", "forest", "bridge", "orange", "castle", "pencil", "dragon", "summer", "winter",
    "butter", "mirror", "jacket", "harbor", "violet", "meadow", "copper", "falcon", "ribbon",
]
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "young": "old", "rich": "poor",
    "wet": "dry", "loud": "quiet", "high": "low", "strong": "weak",
}
UNITS = [  # (from, to, factor)
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("liters", "ml", 1000), ("weeks", "days", 7),
]


def _examples(rng: random.Random) -> List[Dict[str, str]]:
    qa = []
    for _ in range(110):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        qa.append((f"What is {a} + {b}?", str(a + b)))
    for _ in range(60):
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        qa.append((f"What is {a} - {b}?", str(a - b)))
    for _ in range(60):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        qa.append((f"What is {a} times {b}?", str(a * b)))
    for w in WORDS:
        qa.append((f"Reverse the word {w}.", w[::-1]))
        qa.append((f"Write {w} in capital letters.", w.upper()))
        qa.append((f"How many letters are in {w}?", str(len(w))))
        qa.append((f"What is the first letter of {w}?", w[0]))
    for country, capital in CAPITALS.items():
        qa.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}."))
        qa.append((f"Which country has {capital} as its capital?", country))
    for word, opp in OPPOSITES.items():
        qa.append((f"What is the opposite of {word}?", opp))
        qa.append((f"What is the opposite of {opp}?", word))
    for _ in range(60):
        src, dst, f = rng.choice(UNITS)
        n = rng.randint(1, 9)
        qa.append((f"Convert {n} {src} to {dst}.", f"{n} {src} is {n * f} {dst}."))
    for _ in range(40):
        n = rng.randint(0, 998)
        qa.append((f"What number comes after {n}?", str(n + 1)))
    for _ in range(30):
        xs = rng.sample(range(1, 60), 4)
        qa.append((f"Sort these numbers: {', '.join(map(str, xs))}.", ", ".join(map(str, sorted(xs)))))
    for _ in range(30):
        n = rng.randint(1, 99)
        qa.append((f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"))
    rng.shuffle(qa)
    return [{"prompt": f"Human: {q}\nAssistant:", "response": f" {a}"} for q, a in qa]


def write(path: Path, seed: int = 1234) -> int:
    rows = _examples(random.Random(seed))
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return len(rows)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "data" / "sft_tiny.jsonl"
    print(f"wrote {write(out)} examples to {out}")
