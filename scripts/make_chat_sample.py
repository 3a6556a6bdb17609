#!/usr/bin/env python3
"""Writes configs/data/chat-sample.jsonl: the small chat file README's fine-tuning example trains on.

Every line is generated here from a fixed seed (no dataset is copied): short conversations in
{"messages": [...]} form -- arithmetic, unit conversions, spelling, word lengths, a few with a
system message and a few with two user turns -- then a few {"prompt", "completion"} lines. The
answers are computed, so they are right.

  scripts/make_chat_sample.py [OUT]      (default: configs/data/chat-sample.jsonl)
"""
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["apple", "river", "garden", "window", "planet", "yellow", "music", "pencil", "bridge", "orange", "silver",
         "forest", "rocket", "candle", "island", "marble", "thunder", "blanket", "harvest", "lantern", "compass",
         "meadow", "falcon", "puzzle", "velvet", "whisper", "horizon", "kitten", "ladder", "mirror"]
UNITS = [  # name, plural, other, plural, factor, decimals
    ("kilometre", "kilometres", "metre", "metres", 1000, 0),
    ("metre", "metres", "centimetre", "centimetres", 100, 0),
    ("kilogram", "kilograms", "gram", "grams", 1000, 0),
    ("litre", "litres", "millilitre", "millilitres", 1000, 0),
    ("hour", "hours", "minute", "minutes", 60, 0),
    ("minute", "minutes", "second", "seconds", 60, 0),
    ("mile", "miles", "kilometre", "kilometres", 1.609344, 2),
    ("inch", "inches", "centimetre", "centimetres", 2.54, 2),
]
SYSTEMS = ["You are a concise assistant. Answer in one sentence.", "Reply briefly and exactly.",
           "You are a helpful tutor for arithmetic and spelling."]


def plural(n, one, many):
    return one if n == 1 else many


def fmt(x, decimals):
    return str(int(round(x))) if decimals == 0 else f"{x:.{decimals}f}"


def arithmetic(r):
    a, b = r.randint(2, 99), r.randint(2, 99)
    op = r.choice(["plus", "minus", "times"])
    val = a + b if op == "plus" else a - b if op == "minus" else a * b
    q = r.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"How much is {a} {op} {b}?"])
    return q, f"{a} {op} {b} is {val}."


def conversion(r):
    one, many, o_one, o_many, factor, dec = r.choice(UNITS)
    n = r.randint(1, 20)
    q = r.choice([f"How many {o_many} are in {n} {plural(n, one, many)}?", f"Convert {n} {plural(n, one, many)} to {o_many}."])
    v = n * factor
    return q, f"{n} {plural(n, one, many)} is {fmt(v, dec)} {o_many}."


def spelling(r):
    w = r.choice(WORDS)
    kind = r.randint(0, 2)
    if kind == 0:
        return f"How do you spell {w}?", f"{w} is spelled {'-'.join(w.upper())}."
    if kind == 1:
        return f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."
    return f"What is {w} backwards?", f"{w} backwards is {w[::-1]}."


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "configs", "data", "chat-sample.jsonl")
    r = random.Random(16)
    kinds = [arithmetic, conversion, spelling]
    lines = []
    for i in range(300):
        messages = []
        if i % 10 == 3:
            messages.append({"role": "system", "content": r.choice(SYSTEMS)})
        for _ in range(2 if i % 7 == 5 else 1):
            q, a = r.choice(kinds)(r)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        lines.append({"messages": messages})
    for _ in range(20):
        q, a = r.choice(kinds)(r)
        lines.append({"prompt": f"Question: {q}\nAnswer:", "completion": " " + a})
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(f"{out}: {len(lines)} lines")


if __name__ == "__main__":
    main()
