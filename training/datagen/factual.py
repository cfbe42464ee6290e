"""Short factual questions with exact answers, for `tuneserve eval --factual` (retention).

Perplexity on general text shows forgetting as a drift in the next-token distribution;
these show it as facts lost: the eval asks each question greedily, keeps the ones the
base model answers right, and reports the share of those an adapter still answers right
(`factual_retained`). The questions are easy on purpose (capitals, small arithmetic,
everyday facts), so a tiny base gets enough of them right to measure against. English
only: a 135M base answers next to no Korean question right, and a question the base
misses measures nothing. None of them is among the general questions the
function-calling data trains on (function_calling.QUESTIONS), so an adapter cannot
"retain" a fact by having been taught it. An answer never appears in its own question,
so echoing the question is never a right answer.

    python -m training.datagen.factual --out data/factual
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.datagen.function_calling import write_jsonl

# (question, accepted answers): a reply is right when one of them appears as whole
# words in its first sentence (training/retention.py).
FACTS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of England?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of China?", ("Beijing", "Peking")),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Portugal?", ("Lisbon",)),
    ("What is the capital of Ireland?", ("Dublin",)),
    ("What is the capital of Austria?", ("Vienna",)),
    ("What is the capital of Norway?", ("Oslo",)),
    ("What is the capital of Sweden?", ("Stockholm",)),
    ("What is the capital of Thailand?", ("Bangkok",)),
    ("What is the capital of Argentina?", ("Buenos Aires",)),
    ("What is the capital of Kenya?", ("Nairobi",)),
    ("What is the capital of India?", ("New Delhi", "Delhi")),
    ("What is the capital of the United States?", ("Washington",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is 5 plus 3?", ("8", "eight")),
    ("What is 10 minus 4?", ("6", "six")),
    ("What is 3 times 4?", ("12", "twelve")),
    ("What is 50 divided by 5?", ("10", "ten")),
    ("What is 6 plus 7?", ("13", "thirteen")),
    ("What is 9 minus 2?", ("7", "seven")),
    ("What is 5 times 5?", ("25", "twenty-five", "twenty five")),
    ("What is half of 20?", ("10", "ten")),
    ("What is 1 plus 1?", ("2", "two")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many legs does a dog have?", ("4", "four")),
    ("How many sides does a square have?", ("4", "four")),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("How many months are in a year?", ("12", "twelve")),
    ("How many minutes are in an hour?", ("60", "sixty")),
    ("How many wheels does a bicycle have?", ("2", "two")),
    ("How many continents are there?", ("7", "seven")),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the largest planet in the solar system?", ("Jupiter",)),
    ("What is the chemical symbol for water?", ("H2O",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("What do bees make?", ("honey",)),
    ("What color is a ripe banana?", ("yellow",)),
    ("What color is snow?", ("white",)),
    ("What is the closest star to Earth?", ("sun",)),
    ("What planet do we live on?", ("Earth",)),
    ("What is the freezing point of water in Celsius?", ("0", "zero")),
    ("What gas do humans need to breathe?", ("oxygen",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the largest mammal?", ("blue whale", "whale")),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What is the main language spoken in Mexico?", ("Spanish",)),
    ("Which season comes after winter?", ("spring",)),
    ("What is the currency of Japan?", ("yen",)),
]


def factual_rows() -> list[dict[str, object]]:
    return [{"question": q, "answers": list(answers), "lang": "en"} for q, answers in FACTS]


def write_factual(out: Path) -> Path:
    path = out / "factual.jsonl"
    write_jsonl(path, factual_rows())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.datagen.factual", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dir for factual.jsonl")
    args = parser.parse_args(argv)
    print(f"factual: {write_factual(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
