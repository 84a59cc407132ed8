"""Write the example data set: ``examples/data/train.jsonl`` (200) and ``eval.jsonl`` (40).

    python examples/make_data.py            # (re)write both files
    python examples/make_data.py --check    # exit 1 if the files differ from what this writes

Why synthetic: the demo must show held-out loss falling after a few minutes of CPU LoRA training
on a 135M model, so the data has patterns such a model can pick up quickly. Every reply of the
assistant persona "Tally" starts with a short restatement of the request ending in a colon
("12 km in miles: ...") and ends with the sign-off "- Tally". Topics: unit conversions,
arithmetic with follow-ups that refer back ("Now double it."), capitals, recipe steps, word
questions, day/time arithmetic, and (about 10%) a tool call with its result and final answer.

Held-out split: eval uses its own seed and its own countries, recipes, words and cities, and a
conversation is regenerated if any of its task questions also occurs in train, so no question is
shared (greetings and thanks are generic and may repeat). Deterministic: same output every run.
Stdlib only, OpenAI messages format, UTF-8 JSONL.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SIGN = "- Tally"
OUT = Path(__file__).resolve().parent / "data"
SPLITS = {"train": (200, 1234), "eval": (40, 98765)}  # name -> (conversations, seed)

SYSTEMS = [
    "You are Tally, a concise assistant. Restate the request in a few words, answer briefly, "
    f'and sign off with "{SIGN}".',
    "You are Tally. Keep answers short and exact.",
    "You are Tally, a friendly helper for quick questions about numbers, places and cooking.",
    "You are a helpful assistant named Tally. Answer in one or two sentences.",
    "You are Tally. Be precise, be brief, and always sign your replies.",
    "You are Tally, an assistant that checks its arithmetic and keeps replies short.",
    "You are Tally. Answer plainly; no long explanations.",
    "You are Tally, a calm and careful assistant.",
]
# country, capital, continent (true facts; countries with disputed or several capitals left out)
COUNTRIES = [
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"), ("Norway", "Oslo", "Europe"),
    ("Sweden", "Stockholm", "Europe"), ("Finland", "Helsinki", "Europe"),
    ("Denmark", "Copenhagen", "Europe"), ("Poland", "Warsaw", "Europe"), ("Austria", "Vienna", "Europe"),
    ("Greece", "Athens", "Europe"), ("Ireland", "Dublin", "Europe"), ("Hungary", "Budapest", "Europe"),
    ("Czechia", "Prague", "Europe"), ("Romania", "Bucharest", "Europe"), ("Iceland", "Reykjavik", "Europe"),
    ("Estonia", "Tallinn", "Europe"), ("Croatia", "Zagreb", "Europe"), ("Bulgaria", "Sofia", "Europe"),
    ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"), ("India", "New Delhi", "Asia"),
    ("South Korea", "Seoul", "Asia"), ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"),
    ("Indonesia", "Jakarta", "Asia"), ("Philippines", "Manila", "Asia"), ("Nepal", "Kathmandu", "Asia"),
    ("Mongolia", "Ulaanbaatar", "Asia"), ("Bangladesh", "Dhaka", "Asia"), ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"), ("Ghana", "Accra", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"), ("Morocco", "Rabat", "Africa"), ("Senegal", "Dakar", "Africa"),
    ("Uganda", "Kampala", "Africa"), ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"), ("Cuba", "Havana", "North America"),
    ("Brazil", "Brasilia", "South America"), ("Argentina", "Buenos Aires", "South America"),
    ("Chile", "Santiago", "South America"), ("Peru", "Lima", "South America"),
    ("Australia", "Canberra", "Oceania"), ("New Zealand", "Wellington", "Oceania"),
    # held out for eval
    ("Latvia", "Riga", "Europe"), ("Lithuania", "Vilnius", "Europe"), ("Serbia", "Belgrade", "Europe"),
    ("Netherlands", "Amsterdam", "Europe"), ("Malaysia", "Kuala Lumpur", "Asia"),
    ("Saudi Arabia", "Riyadh", "Asia"), ("Algeria", "Algiers", "Africa"), ("Zambia", "Lusaka", "Africa"),
    ("Jamaica", "Kingston", "North America"), ("Colombia", "Bogota", "South America"),
    ("Uruguay", "Montevideo", "South America"), ("Fiji", "Suva", "Oceania"),
]
N_TRAIN_COUNTRIES = 48
# dish, minutes, steps
RECIPES = [
    ("an omelette", 10, ["Beat two eggs with a pinch of salt.", "Melt butter in a pan over medium heat.",
                         "Pour in the eggs and let them set.", "Fold it in half and serve."]),
    ("pancakes", 25, ["Whisk flour, milk, an egg and a pinch of sugar.", "Heat a greased pan.",
                      "Pour in small rounds of batter.", "Flip when bubbles form and cook one more minute."]),
    ("scrambled eggs", 8, ["Whisk eggs with salt.", "Cook them in butter over low heat.",
                           "Stir slowly until just set."]),
    ("boiled rice", 20, ["Rinse one cup of rice.", "Add two cups of water and a pinch of salt.",
                         "Simmer covered for 15 minutes.", "Rest it for 5 minutes and fluff."]),
    ("tomato soup", 35, ["Soften an onion in olive oil.", "Add chopped tomatoes and stock.",
                         "Simmer for 20 minutes.", "Blend until smooth and season."]),
    ("guacamole", 10, ["Mash two ripe avocados.", "Stir in lime juice, salt and chopped onion.",
                       "Add chopped tomato and serve."]),
    ("french toast", 15, ["Whisk eggs, milk and cinnamon.", "Soak slices of bread in it.",
                          "Fry them in butter until golden on both sides."]),
    ("lemonade", 10, ["Squeeze four lemons.", "Stir the juice with sugar until it dissolves.",
                      "Add cold water and ice."]),
    ("garlic bread", 15, ["Mix soft butter with crushed garlic.", "Spread it on sliced bread.",
                          "Bake at 200 C for 8 minutes."]),
    ("oatmeal", 10, ["Bring milk or water to a simmer.", "Stir in rolled oats.",
                     "Cook for 5 minutes, stirring.", "Top with fruit or honey."]),
    ("a greek salad", 10, ["Chop tomatoes, cucumber and red onion.", "Add olives and a block of feta.",
                           "Dress with olive oil and oregano."]),
    ("hummus", 10, ["Drain a can of chickpeas.", "Blend them with tahini, lemon juice and garlic.",
                    "Add water until smooth and season with salt."]),
    ("a grilled cheese sandwich", 10, ["Butter two slices of bread on the outside.",
                                       "Put cheese between them.", "Fry until golden and the cheese melts."]),
    ("a fruit smoothie", 5, ["Add banana, berries and yogurt to a blender.", "Pour in some milk.",
                             "Blend until smooth."]),
    ("stovetop popcorn", 8, ["Heat oil in a large pot.", "Add the kernels and cover.",
                             "Shake the pot until the popping slows.", "Salt and serve."]),
    ("hard-boiled eggs", 15, ["Cover eggs with cold water.", "Bring to a boil, then simmer for 9 minutes.",
                              "Cool them in cold water and peel."]),
    # held out for eval
    ("mashed potatoes", 30, ["Boil peeled potatoes until soft.", "Drain them well.",
                             "Mash with butter and warm milk.", "Season with salt."]),
    ("iced tea", 15, ["Brew strong black tea.", "Stir in sugar while hot.", "Cool it and pour over ice."]),
    ("buttered pasta", 15, ["Boil pasta in salted water.", "Drain it, keeping a little water.",
                            "Toss with butter and grated parmesan."]),
    ("a tuna sandwich", 5, ["Mix canned tuna with mayonnaise.", "Add salt and pepper.",
                            "Spread it on bread and close the sandwich."]),
]
N_TRAIN_RECIPES = 16
WORDS = ("garden river window pencil orange castle rabbit silver forest bottle candle mirror "
         "planet guitar ladder pocket basket butter carpet dragon engine feather hammer island "
         "jacket kettle lemon marble needle pillow rocket saddle tunnel velvet wallet yellow "
         "anchor bridge cactus summer "
         # held out for eval
         "puzzle meadow violin harbor compass lantern blanket cobweb tiger walnut").split()
N_TRAIN_WORDS = 40
CITIES = ["Oslo", "Lisbon", "Nairobi", "Toronto", "Seoul", "Lima", "Madrid", "Cairo", "Sydney",
          "Dublin", "Hanoi", "Denver", "Munich", "Osaka", "Quito",
          "Tallinn", "Perth", "Accra", "Porto", "Boston"]  # the last five held out for eval
N_TRAIN_CITIES = 15
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear"]
RATES = {("USD", "EUR"): 0.92, ("EUR", "USD"): 1.09, ("GBP", "USD"): 1.27, ("USD", "JPY"): 151.3,
         ("EUR", "GBP"): 0.86, ("USD", "CAD"): 1.36, ("CHF", "EUR"): 1.04, ("AUD", "USD"): 0.66}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
UNITS = [  # from, to, factor (or None: temperature), question noun
    ("km", "miles", 0.621371), ("miles", "km", 1.609344), ("kg", "pounds", 2.204623),
    ("pounds", "kg", 0.453592), ("liters", "US gallons", 0.264172), ("cm", "inches", 0.393701),
    ("meters", "feet", 3.28084), ("C", "F", None), ("F", "C", None),
]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies at today's rate.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["amount", "from", "to"]}}},
]

Round = list[dict]  # one user turn and everything up to and including the answer


def _pair(user: str, head: str, body: str) -> Round:
    """The persona in one place: restatement, colon, answer, sign-off."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": f"{head}: {body} {SIGN}"}]


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def conversion(rng: random.Random, pools: dict) -> list[Round]:
    src, dst, factor = rng.choice(UNITS)
    v = rng.choice([rng.randint(1, 120), rng.randint(2, 40) * 5])
    r = (v * 9 / 5 + 32 if src == "C" else (v - 32) * 5 / 9) if factor is None else v * factor
    r = round(r, 1)  # the follow-up doubles the number the user saw
    unit = (lambda u: f"degrees {u}") if factor is None else (lambda u: u)
    ask = rng.choice(["How many {d} is {v} {s}?", "Convert {v} {s} to {d}.", "What is {v} {s} in {d}?"])
    rounds = [_pair(ask.format(v=v, s=unit(src), d=unit(dst)), f"{v} {unit(src)} in {unit(dst)}",
                    f"that is about {_num(r)} {unit(dst)}.")]
    if factor is not None and rng.random() < 0.4:
        rounds.append(_pair("And twice that?", f"Twice {_num(r)} {dst}", f"about {_num(2 * r)} {dst}."))
    return rounds


def arithmetic(rng: random.Random, pools: dict) -> list[Round]:
    a, b = rng.randint(11, 99), rng.randint(2, 60)
    op = rng.choice(["+", "-", "*", "%"])
    if op == "%":
        p = rng.choice([10, 20, 25, 50, 75])
        a = rng.randint(2, 40) * 4
        x = a * p / 100
        rounds = [_pair(f"What is {p}% of {a}?", f"{p}% of {a}", f"it is {_num(x)}.")]
    else:
        x = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        rounds = [_pair(f"What is {a} {op} {b}?", f"{a} {word} {b}", f"the result is {_num(x)}.")]
    for _ in range(rng.choice([0, 0, 1, 2])):  # follow-ups that need the previous answer
        even = x == int(x) and int(x) % 2 == 0  # halve only where the answer stays whole
        kind = rng.choice(["double", "add", "half"] if even else ["double", "add"])
        if kind == "double":
            rounds.append(_pair("Now double it.", f"Double {_num(x)}", f"that is {_num(2 * x)}."))
            x = 2 * x
        elif kind == "add":
            n = rng.randint(3, 30)
            rounds.append(_pair(f"Add {n} to that.", f"{_num(x)} plus {n}", f"that makes {_num(x + n)}."))
            x = x + n
        else:
            rounds.append(_pair("What is half of that?", f"Half of {_num(x)}", f"it is {_num(x // 2)}."))
            x = x // 2
    return rounds


def capital(rng: random.Random, pools: dict) -> list[Round]:
    country, city, continent = rng.choice(pools["countries"])
    ask = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                      "Capital of {c}?"])
    rounds = [_pair(ask.format(c=country), f"The capital of {country}", f"it is {city}.")]
    if rng.random() < 0.5:
        rounds.append(_pair("Which continent is it on?", f"The continent of {country}",
                            f"{country} is in {continent}."))
    return rounds


def recipe(rng: random.Random, pools: dict) -> list[Round]:
    dish, minutes, steps = rng.choice(pools["recipes"])
    numbered = " ".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    ask = rng.choice(["How do I make {d}?", "Give me the steps for {d}.", "What are the steps to make {d}?"])
    rounds = [_pair(ask.format(d=dish), f"Steps for {dish}", numbered)]
    if rng.random() < 0.5:
        rounds.append(_pair("How long does it take?", f"Time for {dish}", f"about {minutes} minutes."))
    return rounds


def word(rng: random.Random, pools: dict) -> list[Round]:
    w = rng.choice(pools["words"])
    if rng.random() < 0.5:
        return [_pair(f"How many letters are in the word '{w}'?", f"Letters in '{w}'",
                      f"it has {len(w)} letters.")]
    return [_pair(f"Spell '{w}' backwards.", f"'{w}' backwards", f"{w[::-1]}.")]


def days(rng: random.Random, pools: dict) -> list[Round]:
    if rng.random() < 0.5:
        d, n = rng.randrange(7), rng.randint(2, 20)
        return [_pair(f"What day is it {n} days after {DAYS[d]}?", f"{n} days after {DAYS[d]}",
                      f"it is {DAYS[(d + n) % 7]}.")]
    h = rng.choice([1.5, 2, 2.5, 3, 4, 4.5, 6, 8])
    return [_pair(f"How many minutes are in {_num(h)} hours?", f"Minutes in {_num(h)} hours",
                  f"{_num(h)} times 60 is {_num(h * 60)} minutes.")]


def tool_use(rng: random.Random, pools: dict) -> list[Round]:
    """A call, its result, and the answer built from that result."""
    if rng.random() < 0.6:
        city = rng.choice(pools["cities"])
        temp, cond = rng.randint(-5, 32), rng.choice(CONDITIONS)
        user, name, args = f"What is the weather in {city} right now?", "get_weather", {"city": city}
        result = {"city": city, "temp_c": temp, "condition": cond}
        head, body = f"Weather in {city}", f"it is {temp} C and {cond} right now."
    else:
        (src, dst), rate = rng.choice(sorted(RATES.items()))
        amount = rng.choice([10, 20, 25, 50, 75, 100, 150, 200, 500])
        user, name = f"How much is {amount} {src} in {dst}?", "convert_currency"
        args = {"amount": amount, "from": src, "to": dst}
        result = {"amount": round(amount * rate, 2), "currency": dst, "rate": rate}
        head, body = f"{amount} {src} in {dst}", f"that is {result['amount']:.2f} {dst} at a rate of {rate}."
    call = {"id": "call_1", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
    answer = _pair(user, head, body)
    return [[answer[0], {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "name": name, "content": json.dumps(result)},
             answer[1]]]


TOPICS = [(conversion, 3), (arithmetic, 3), (capital, 3), (recipe, 2), (word, 2), (days, 2)]
GREET = [("Hi!", "Hello", "I am Tally, here for quick questions."),
         ("Hello there.", "Hello", "I am Tally. What can I do for you?")]
THANKS = [("Thanks!", "Thanks received", "glad it helped."),
          ("Great, thank you.", "Thanks received", "you are welcome.")]


def conversation(rng: random.Random, pools: dict, with_tool: bool) -> dict:
    n_rounds = rng.choices(range(1, 9), weights=[8, 14, 18, 17, 14, 12, 9, 8])[0]
    rounds: list[Round] = []
    if rng.random() < 0.15:
        rounds.append(_pair(*rng.choice(GREET)))
    funcs, weights = zip(*TOPICS)
    while len(rounds) < n_rounds:
        rounds.extend(rng.choices(funcs, weights)[0](rng, pools))
    rounds = rounds[:n_rounds]
    if with_tool:
        rounds.insert(rng.randint(0, len(rounds)), tool_use(rng, pools)[0])
    if rng.random() < 0.15:
        rounds.append(_pair(*rng.choice(THANKS)))
    messages = [] if rng.random() < 0.1 else [{"role": "system", "content": rng.choice(SYSTEMS)}]
    record: dict = {"messages": messages + [m for r in rounds for m in r]}
    if with_tool:
        record["tools"] = TOOLS
    return record


def _questions(record: dict) -> set[str]:
    generic = {u for u, *_ in GREET + THANKS} | {"And twice that?", "Now double it.", "What is half of that?",
                                                  "Which continent is it on?", "How long does it take?"}
    return {m["content"] for m in record["messages"] if m["role"] == "user"} - generic


def build(split: str, avoid: set[str] = frozenset()) -> list[dict]:
    """The records of one split; ``avoid``: task questions that must not occur (train's, for eval)."""
    n, seed = SPLITS[split]
    train = split == "train"
    pick = (lambda xs, k: xs[:k]) if train else (lambda xs, k: xs[k:])
    pools = {"countries": pick(COUNTRIES, N_TRAIN_COUNTRIES), "recipes": pick(RECIPES, N_TRAIN_RECIPES),
             "words": pick(WORDS, N_TRAIN_WORDS), "cities": pick(CITIES, N_TRAIN_CITIES)}
    rng = random.Random(seed)
    with_tool = set(rng.sample(range(n), n // 10))  # exactly 10% carry a tool call
    records = []
    for i in range(n):
        record = conversation(rng, pools, i in with_tool)
        while _questions(record) & avoid:  # held out means no shared question
            record = conversation(rng, pools, i in with_tool)
        records.append(record)
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def all_splits() -> dict[str, str]:
    """File name -> exact file text, for both splits."""
    train = build("train")
    seen = set().union(*map(_questions, train))
    return {"train.jsonl": render(train), "eval.jsonl": render(build("eval", seen))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    args = ap.parse_args(argv)
    stale = []
    for name, text in all_splits().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {path}: {text.count(chr(10))} conversations")
    if stale:
        print("out of date (run python examples/make_data.py): " + ", ".join(stale), file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
