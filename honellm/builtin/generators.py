"""Deterministic generators of the built-in tasks' records (seeded; unique texts; splits never overlap)."""

from __future__ import annotations

import json
import random

INTENTS = {
    "billing": [
        "I was charged {amount} twice for order {order}, can you refund one of them?",
        "Why does my invoice for {month} show {amount} when my plan costs less?",
        "There's a charge of {amount} on my card that I don't recognise.",
        "Can I get a receipt for the {amount} payment I made in {month}?",
        "My payment of {amount} went through but the order {order} still says unpaid.",
        "Please update the credit card you bill me with, the old one expired.",
        "I think I was overcharged on the {product}, it was on sale for less.",
        "How do I get a refund for the {product}? I paid {amount}.",
    ],
    "technical": [
        "The {app} keeps crashing whenever I open the settings page.",
        "My {product} won't turn on even after charging it all night.",
        "I get error code {code} when I try to sync my {product}.",
        "The {app} is stuck on a loading screen since the last update.",
        "Bluetooth won't pair between my phone and the {product}.",
        "Every time I upload a photo the {app} freezes for a minute.",
        "The screen of my {product} flickers after a few minutes of use.",
        "Notifications stopped working in the {app} on my tablet.",
    ],
    "shipping": [
        "My order {order} was supposed to arrive on {day} but it's still not here.",
        "The tracking for order {order} hasn't updated in {n} days.",
        "Can you ship the {product} to a different address than my billing one?",
        "The courier left my parcel at the wrong house, order {order}.",
        "How long does delivery to {city} usually take?",
        "My package arrived but the box was crushed and the {product} is dented.",
        "Do you offer express delivery for the {product}? I need it by {day}.",
        "Order {order} says delivered but I never received anything.",
    ],
    "account": [
        "I can't log in, it says my password is wrong even after resetting it.",
        "How do I change the email address on my profile?",
        "I never received the verification code for two-factor login.",
        "Someone else may have accessed my account from {city}.",
        "Please merge my two accounts, I signed up twice by mistake.",
        "My username was changed and I didn't do it.",
        "The password reset link in your email has expired already.",
        "How can I download all the data you hold on my profile?",
    ],
    "cancel": [
        "I want to cancel my subscription before the next renewal on {day}.",
        "Please cancel order {order}, I ordered the {product} by mistake.",
        "How do I end my membership? I don't use it anymore.",
        "Stop my monthly plan from {month} onward, I'm moving to another provider.",
        "Can I cancel the {product} order if it has already shipped?",
        "Please close my plan and don't bill me again.",
        "I'd like to terminate the contract for the {product} service.",
        "Cancel the auto-renewal, I only wanted one month.",
    ],
    "feedback": [
        "Just wanted to say the new {app} design looks great, well done.",
        "Your support agent {name} was really helpful yesterday, thank you.",
        "It would be nice if the {product} came in more colours.",
        "The {app} would be better with a dark mode, please consider it.",
        "I love the {product}, best purchase I've made this year.",
        "Suggestion: let us sort orders by date in the {app}.",
        "The instructions that came with the {product} were confusing.",
        "Great service overall, but the hold music is awful.",
    ],
}

FILL = {
    "amount": ["$12.99", "$49", "$5.50", "$120", "$19.95", "$8", "$230", "$64.10"],
    "order": ["#4821", "#1093", "#77310", "#5002", "#3187", "#90411", "#2675", "#618"],
    "month": ["March", "June", "October", "January", "August", "May"],
    "product": ["headphones", "smart watch", "blender", "router", "e-reader", "speaker", "camera", "keyboard"],
    "app": ["mobile app", "desktop app", "web dashboard", "companion app"],
    "code": ["E42", "0x80070005", "503", "SYNC-17", "E-1002"],
    "day": ["Monday", "Friday", "the 14th", "last week", "Tuesday", "the weekend"],
    "n": ["3", "five", "10", "two", "6"],
    "city": ["Lisbon", "Denver", "Osaka", "Nairobi", "Leeds", "Toronto"],
    "name": ["Priya", "Tom", "Aiko", "Luis", "Maja"],
}
OPENERS = ["", "", "", "Hi, ", "Hello! ", "Hey team, ", "Good morning, ", "Quick question: "]
CLOSERS = ["", "", "", " Thanks.", " Please help.", " Thanks in advance!", " Regards, Sam.", " Any update?"]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(**{k: rng.choice(v) for k, v in FILL.items() if "{" + k + "}" in template})


def _message(intent: str, rng: random.Random) -> str:
    body = _fill(rng.choice(INTENTS[intent]), rng)
    opener = rng.choice(OPENERS)
    if opener.endswith((", ", ": ")) and not body.startswith(("I ", "I'")):
        body = body[0].lower() + body[1:]
    return f"{opener}{body}{rng.choice(CLOSERS)}"


def _unique(make, count: int, rng: random.Random, key=lambda r: r["text"]) -> list[dict]:
    seen, out = set(), []
    for _ in range(count * 200):
        record = make(rng)
        if key(record) not in seen:
            seen.add(key(record))
            out.append(record)
            if len(out) == count:
                return out
    raise RuntimeError(f"could not generate {count} unique records")


def intents() -> list[dict]:
    rng = random.Random(20261126)
    labels = list(INTENTS)
    total = sum(SIZES["intents"].values())

    def make(r):
        label = labels[r.randrange(len(labels))]
        return {"text": _message(label, r), "label": label}

    return _unique(make, total, rng)


ITEMS = ["apples", "stickers", "marbles", "books", "coins", "cookies", "pencils", "shells"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]


def _problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        expression = f"{a} + {b}"
    elif kind == 1:
        a = rng.randint(10, 40)
        b = rng.randint(1, a - 1)
        q, ans = f"{name} had {a} {item} and gave away {b}. How many {item} are left?", a - b
        expression = f"{a} - {b}"
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q, ans = f"{name} has {a} bags with {b} {item} in each bag. How many {item} are there in total?", a * b
        expression = f"{a} * {b}"
    elif kind == 3:
        b = rng.randint(2, 6)
        ans = rng.randint(2, 9)
        a = b * ans
        q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
        expression = f"{a} / {b}"
    else:
        a, b = rng.randint(5, 20), rng.randint(2, 9)
        c = rng.randint(1, a + b - 1)
        q, ans = f"{name} has {a} {item}, buys {b} more, then loses {c}. How many {item} does {name} have?", a + b - c
        expression = f"{a} + {b} - {c}"
    # `expression` is the computation that answers the question (the calculator's result of it is `answer`):
    # what a tool-use demonstration calls the calculator with (`arithmetic_tools` below).
    return {"question": q, "answer": str(ans), "expression": expression}


def arithmetic() -> list[dict]:
    return _unique(_problem, sum(SIZES["arithmetic"].values()), random.Random(7), key=lambda r: r["question"])


def tool_call_text(name: str, arguments: dict) -> str:
    """An assistant turn that calls a tool, in the Hermes/Qwen format `parse_tool_calls` reads first."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def arithmetic_tools() -> list[dict]:
    """The arithmetic problems as demonstrations of a calculator episode (chat records, same splits): the user's
    question, the assistant's call of the calculator with the problem's expression, the tool's result, and the
    assistant's final answer (the number). SFT on them is the cold start before GRPO with tools: a model that
    never calls the tool gives RL no call to reinforce (see docs/reward.md, "Multi-turn tool use")."""
    # The tool turn's content is what the calculator returns for the expression: the answer (a test checks it on
    # every record; this foundation module does not import the tools themselves, which live a layer up).
    out = []
    for r in arithmetic():
        out.append({"messages": [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": tool_call_text("calculator", {"expression": r["expression"]})},
            {"role": "tool", "name": "calculator", "content": r["answer"]},
            {"role": "assistant", "content": r["answer"]},
        ], "question": r["question"], "answer": r["answer"], "expression": r["expression"]})
    return out


TEAMS = {"billing": "billing team", "technical": "technical support team", "shipping": "delivery team",
         "account": "account security team", "cancel": "retention team", "feedback": "product team"}
GOOD = [
    "I'm sorry for the trouble. I've passed this to our {team}, who will get back to you within 24 hours.",
    "Thanks for letting us know. Our {team} handles this and will contact you shortly with next steps.",
    "Thank you for reaching out. I've opened a ticket with the {team}; you'll hear from them today.",
]
UNHELPFUL = [
    "That's not something we can help with.",
    "Please read the FAQ before contacting us.",
    "Have you tried turning it off and on again?",
    "We are very busy right now, try again later.",
]


def support_prefs() -> list[dict]:
    rng = random.Random(31)
    labels = list(INTENTS)
    total = sum(SIZES["support_prefs"].values())

    def make(r):
        label = labels[r.randrange(len(labels))]
        wrong = TEAMS[r.choice([x for x in labels if x != label])]
        # Most rejected replies are as polite and as long as the chosen ones but route to the wrong team, so
        # neither length nor tone gives the answer away: the preference is about understanding the request.
        rejected = r.choice(GOOD).format(team=wrong) if r.random() < 0.6 else r.choice(UNHELPFUL)
        return {"prompt": _message(label, r), "chosen": r.choice(GOOD).format(team=TEAMS[label]), "rejected": rejected}

    return _unique(make, total, rng, key=lambda rec: rec["prompt"])


# Split sizes in order; records are generated once and cut in this order, so splits never overlap.
SIZES = {
    "intents": {"train": 480, "validation": 120, "test": 120},
    "arithmetic": {"train": 400, "validation": 100, "test": 100},
    "support_prefs": {"train": 300, "validation": 100, "test": 100},
}
SIZES["arithmetic_tools"] = dict(SIZES["arithmetic"])  # the same problems, split the same way
GENERATORS = {"intents": intents, "arithmetic": arithmetic, "support_prefs": support_prefs,
              "arithmetic_tools": arithmetic_tools}
