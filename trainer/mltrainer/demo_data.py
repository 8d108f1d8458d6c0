"""The demo's small sentiment set: generated from templates, deterministic by seed.

`python -m mltrainer.demo_data configs/data` writes sentiment-train.csv and sentiment-eval.csv;
the generated files are committed so the demo needs nothing but the repository.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

SUBJECTS = ["the film", "this phone", "the service", "our hotel room", "the new album", "the pasta", "this laptop",
            "the support team", "the concert", "this book"]
POSITIVE = ["was wonderful", "exceeded every expectation", "made my day", "is brilliant and fast", "felt delightful",
            "was a real pleasure", "works perfectly", "is absolutely great"]
NEGATIVE = ["was terrible", "broke after a day", "ruined the evening", "is slow and frustrating", "felt awful",
            "was a waste of money", "never works", "is painfully bad"]
ENDINGS = ["", " honestly.", " and I would say so again.", " to be fair.", "!", " overall."]


def generate(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        phrase = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append((f"{rng.choice(SUBJECTS).capitalize()} {phrase}{rng.choice(ENDINGS)}", label))
    return rows


def write(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main(out_dir: str = "configs/data") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "sentiment-train.csv", generate(512, seed=1))
    write(out / "sentiment-eval.csv", generate(128, seed=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
