"""bAbI tasks QA1-QA5 (Weston et al. 2015) from a small simulated world, and BABILong-style long
contexts (Kuratov et al. 2024): the story's facts scattered, in order, through real book text.

    facts, question, answer = make_babi(2, seed=0, n_facts=8)
    # ["Sandra went to the office.", "Sandra picked up the milk.", ...], "Where is the milk?", "office"
    ex = make_babilong(2, 16_000, haystack=book_text, seed=0)   # ex.answer == " office"

QA1 single supporting fact  people move:                 "Where is Mary?"
QA2 two supporting facts    people move, take, drop:     "Where is the football?"
QA3 three supporting facts  same world:                  "Where was the football before the kitchen?"
QA4 two-argument relations  rooms on a grid:             "What is north of the bedroom?" /
                                                         "What is the bedroom north of?"
QA5 three-argument relations people also give objects:   "Who gave the apple to Bill?" /
      "What did Fred give to Bill?" / "Who did Fred give the apple to?" / "Who received the apple?" /
      "Who gave the apple?"

Every answer is one word, read off the simulated world, so it is always right. A question only asks
what the facts determine:
- a person's location is unknown until a fact moves them; only such people take or drop objects;
- an object's location is known from its first pick-up on; its *trace* is the list of locations it
  was in since then (a new entry each time its carrier moves);
- QA3 "before the X": X occurs exactly once in the object's trace, the answer is the entry before it;
- QA4 asks about a stated relation; rooms sit on distinct grid cells, so the answer is unique;
- QA5 questions refer to the most recent give that matches the question (bAbI's convention).
"""

from __future__ import annotations

import random

from titans.data.tokenizer import Tokenizer

from .common import Example, check_haystack, check_int, check_tokenizer
from .haystack import fit_context

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
QA5_PEOPLE = ("Bill", "Fred", "Jeff", "Mary")
LOCATIONS = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk")
MOVE_VERBS = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
TAKE_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
GIVE_VERBS = ("gave", "handed", "passed")
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}

DEFAULT_FACTS = {1: 10, 2: 20, 3: 30, 4: 2, 5: 20}
MIN_FACTS = {1: 1, 2: 2, 3: 3, 4: 1, 5: 3}
MAX_FACTS = {1: 10_000, 2: 10_000, 3: 10_000, 4: len(LOCATIONS) - 1, 5: 10_000}
_ACTION_WEIGHTS = {1: {"move": 1}, 2: {"move": 4, "take": 3, "drop": 2}, 3: {"move": 4, "take": 3, "drop": 2},
                   5: {"move": 3, "take": 3, "give": 4, "drop": 1}}
_TRIES = 1000  # stories re-drawn until one has a question; tiny n_facts may need a few dozen


class _World:
    """People moving between rooms and carrying objects; the true state is always known here."""

    def __init__(self, rng: random.Random, people: tuple[str, ...]):
        self.rng, self.people = rng, people
        self.where = {p: rng.choice(LOCATIONS) for p in people}  # true location, hidden until a move
        self.known: set[str] = set()  # people whose location some fact has stated
        self.lying_at = {o: rng.choice(LOCATIONS) for o in OBJECTS}  # where an object not carried lies
        self.holder: dict[str, str | None] = {o: None for o in OBJECTS}
        self.trace: dict[str, list[str]] = {o: [] for o in OBJECTS}
        self.gives: list[tuple[str, str, str]] = []  # (giver, object, receiver)
        self.facts: list[str] = []

    def location(self, obj: str) -> str:
        holder = self.holder[obj]
        return self.where[holder] if holder is not None else self.lying_at[obj]

    def _options(self) -> dict[str, list[tuple]]:
        # lists in fixed order (never iterate a set): the story must not depend on hash seeds
        known = [p for p in self.people if p in self.known]
        return {
            "move": [(p,) for p in self.people],
            "take": [(p, o) for p in known for o in OBJECTS
                     if self.holder[o] is None and self.lying_at[o] == self.where[p]],
            "drop": [(self.holder[o], o) for o in OBJECTS if self.holder[o] in known],
            "give": [(p, o, q) for o in OBJECTS for p in [self.holder[o]] if p in known
                     for q in self.people if q != p and self.where[q] == self.where[p]],
        }

    def step(self, weights: dict[str, int]) -> None:
        options = self._options()
        kinds = [k for k in weights if options[k]]
        kind = self.rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        args = self.rng.choice(options[kind])
        getattr(self, kind)(*args)

    def move(self, person: str) -> None:
        self.where[person] = self.rng.choice([loc for loc in LOCATIONS if loc != self.where[person]])
        self.known.add(person)
        for obj in OBJECTS:
            if self.holder[obj] == person and self.trace[obj]:
                self.trace[obj].append(self.where[person])
        self.facts.append(f"{person} {self.rng.choice(MOVE_VERBS)} the {self.where[person]}.")

    def take(self, person: str, obj: str) -> None:
        self.holder[obj] = person
        if not self.trace[obj] or self.trace[obj][-1] != self.where[person]:
            self.trace[obj].append(self.where[person])
        there = " there" if self.rng.random() < 0.3 else ""
        self.facts.append(f"{person} {self.rng.choice(TAKE_VERBS)} the {obj}{there}.")

    def drop(self, person: str, obj: str) -> None:
        self.holder[obj], self.lying_at[obj] = None, self.where[person]
        there = " there" if self.rng.random() < 0.3 else ""
        self.facts.append(f"{person} {self.rng.choice(DROP_VERBS)} the {obj}{there}.")

    def give(self, person: str, obj: str, receiver: str) -> None:
        self.holder[obj] = receiver
        self.gives.append((person, obj, receiver))
        self.facts.append(f"{person} {self.rng.choice(GIVE_VERBS)} the {obj} to {receiver}.")


def _question(qa: int, world: _World) -> tuple[str, str] | None:
    """(question, answer) about the world's story, or None when the story supports none."""
    rng = world.rng
    if qa == 1:
        people = [p for p in world.people if p in world.known]
        person = rng.choice(people)
        return f"Where is {person}?", world.where[person]
    if qa == 2:
        seen = [o for o in OBJECTS if world.trace[o]]
        if not seen:
            return None
        obj = rng.choice(seen)
        return f"Where is the {obj}?", world.location(obj)
    if qa == 3:
        options = [(o, trace[i], trace[i - 1]) for o in OBJECTS for trace in [world.trace[o]]
                   for i in range(1, len(trace)) if trace.count(trace[i]) == 1]
        if not options:
            return None
        obj, place, before = rng.choice(options)
        return f"Where was the {obj} before the {place}?", before
    # qa == 5: pick a give, a question form about it; the answer is the latest matching give
    if not world.gives:
        return None
    giver, obj, receiver = rng.choice(world.gives)
    form = rng.randrange(5)
    latest = lambda match: next(g for g in reversed(world.gives) if match(g))
    if form == 0:
        return f"Who gave the {obj} to {receiver}?", latest(lambda g: g[1:] == (obj, receiver))[0]
    if form == 1:
        return f"What did {giver} give to {receiver}?", latest(lambda g: (g[0], g[2]) == (giver, receiver))[1]
    if form == 2:
        return f"Who did {giver} give the {obj} to?", latest(lambda g: g[:2] == (giver, obj))[2]
    if form == 3:
        return f"Who received the {obj}?", latest(lambda g: g[1] == obj)[2]
    return f"Who gave the {obj}?", latest(lambda g: g[1] == obj)[0]


def _relations(rng: random.Random, n_facts: int) -> tuple[list[str], str, str]:
    """QA4: n_facts + 1 rooms placed one by one next to a placed room, on free grid cells."""
    rooms = rng.sample(LOCATIONS, n_facts + 1)
    cell = {rooms[0]: (0, 0)}
    relations = []  # (a, d, b): "the a is d of the b"
    for room in rooms[1:]:
        free = [(old, d) for old in cell for d, (dx, dy) in DIRECTIONS.items()
                if (cell[old][0] + dx, cell[old][1] + dy) not in cell.values()]
        old, d = rng.choice(free)
        cell[room] = (cell[old][0] + DIRECTIONS[d][0], cell[old][1] + DIRECTIONS[d][1])
        relations.append((room, d, old))
    rng.shuffle(relations)
    stated = [r if rng.random() < 0.5 else (r[2], OPPOSITE[r[1]], r[0]) for r in relations]
    facts = [f"The {a} is {d} of the {b}." for a, d, b in stated]
    a, d, b = rng.choice(relations)
    if rng.random() < 0.5:
        a, d, b = b, OPPOSITE[d], a
    if rng.random() < 0.5:
        return facts, f"What is {d} of the {b}?", a
    return facts, f"What is the {a} {d} of?", b


def _check_qa(where: str, qa, n_facts) -> int:
    if isinstance(qa, bool) or qa not in (1, 2, 3, 4, 5):
        raise ValueError(f"{where}: qa must be an int in 1..5 (bAbI QA1-QA5), got {qa!r}")
    n_facts = DEFAULT_FACTS[qa] if n_facts is None else n_facts
    return check_int(where, f"n_facts (for QA{qa})", n_facts, MIN_FACTS[qa], MAX_FACTS[qa])


def _story(qa: int, rng: random.Random, n_facts: int) -> tuple[list[str], str, str]:
    if qa == 4:
        return _relations(rng, n_facts)
    for _ in range(_TRIES):
        world = _World(rng, QA5_PEOPLE if qa == 5 else PEOPLE)
        for _ in range(n_facts):
            world.step(_ACTION_WEIGHTS[qa])
        found = _question(qa, world)
        if found is not None:
            return world.facts, *found
    raise ValueError(f"make_babi: no QA{qa} story with a question in {_TRIES} draws of n_facts={n_facts} "
                     f"facts; use more facts")


def _rng(qa: int, seed: int) -> random.Random:
    return random.Random(f"babi-qa{qa}-{seed}")  # str seeds are hashed with sha512: stable everywhere


def make_babi(qa: int, seed: int = 0, n_facts: int | None = None) -> tuple[list[str], str, str]:
    """A bare bAbI story: (facts, question, answer), e.g. (["Mary went to the bathroom.", ...],
    "Where is Mary?", "bathroom"); the answer has no leading space. n_facts: story length (default
    DEFAULT_FACTS[qa]; QA4 allows 1-5 relations). Deterministic in (qa, seed, n_facts), and each QA
    type draws its own stories (seed 0 of QA1 and of QA2 are unrelated)."""
    n_facts = _check_qa("make_babi", qa, n_facts)
    check_int("make_babi", "seed", seed, 0)
    return _story(qa, _rng(qa, seed), n_facts)


def make_babilong(qa: int, length: int, *, haystack: str, tokenizer: Tokenizer | None = None, seed: int = 0,
                  n_facts: int | None = None) -> Example:
    """The facts of make_babi(qa, seed, n_facts), in order, each at a sentence boundary of the haystack
    text at seeded uniform random positions over the whole context; the question at the end.

    The prompt (context + question) has `length` tokens of `tokenizer` (default bytes), within
    haystack.TOLERANCE below, never above; a short haystack is cycled. Answer: " <word>".
    meta: qa, seed, n_facts, facts, fact_offsets (character offsets in the context, increasing),
    fact_depths, babi_question, answers, plus fit_context's length and haystack fields.
    """
    where = "make_babilong"
    n_facts = _check_qa(where, qa, n_facts)
    check_int(where, "length", length, 1)
    check_int(where, "seed", seed, 0)
    haystack = check_haystack(where, haystack)
    tokenizer = check_tokenizer(where, tokenizer)
    rng = _rng(qa, seed)
    facts, babi_question, answer = _story(qa, rng, n_facts)
    depths = sorted(rng.random() for _ in facts)
    question = f"\nQuestion: {babi_question}\nAnswer:"
    context, offsets, fit = fit_context(haystack, length, facts, depths, question,
                                        tokenizer=tokenizer, start=rng.random(), keep_order=True)
    meta = {"qa": qa, "seed": seed, "n_facts": n_facts, "facts": facts, "fact_offsets": offsets,
            "fact_depths": [round(off / len(context), 4) for off in offsets], "babi_question": babi_question,
            "answers": [answer], **fit}
    return Example(f"babilong_qa{qa}", context, question, " " + answer, meta)
