"""A simple, learnable stand-in for human preferences: people like upbeat answers."""

from training.data import split_by_prompt

TOPICS = [
    "cats",
    "dogs",
    "birds",
    "fish",
    "trees",
    "rivers",
    "mountains",
    "cities",
    "colors",
    "numbers",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "sea",
    "sky",
    "light",
    "air",
]
ASKS = ("Tell me about {}.", "What do you think of {}?", "Explain {} please.")


def preference_pairs(n_topics: int = len(TOPICS)) -> list[dict]:
    return [
        {"prompt": ask.format(topic), "chosen": f"{topic} are good, yes.", "rejected": f"{topic} are bad, no."}
        for topic in TOPICS[:n_topics]
        for ask in ASKS
    ]


def ranked_groups(n_topics: int = len(TOPICS)) -> list[dict]:
    return [
        {
            "prompt": ask.format(topic),
            "completions": [f"{topic} are bad, no.", f"{topic} are good, yes.", f"{topic} are fine, maybe."],
            "ranks": [[3, 1, 2], [3, 1, 1]],  # two annotators; the second ties the upbeat answers
        }
        for topic in TOPICS[:n_topics]
        for ask in ASKS
    ]


def less_likely_pairs() -> list[dict]:
    """Pairs whose chosen answer the tiny base model finds less likely than the rejected one (same length)."""
    return [
        {"prompt": ask.format(topic), "chosen": f"{topic} are good.", "rejected": f"{topic} are fine."}
        for topic in TOPICS
        for ask in ASKS
    ]


def less_likely_groups() -> list[dict]:
    """The same preference as ranked groups of two."""
    return [
        {"prompt": p["prompt"], "completions": [p["rejected"], p["chosen"]], "ranks": [[2, 1]]}
        for p in less_likely_pairs()
    ]


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    return split_by_prompt(records, 0.25, seed=0)
