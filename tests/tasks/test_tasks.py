"""Task generators: determinism, needles and facts where the metadata says, answers re-derived
independently, token lengths, depth placement, scoring, MQAR layout, argument errors."""

import re
import time
from collections import defaultdict

import pytest
import torch

from titans.data.tokenizer import ByteTokenizer, train_bpe
from titans.tasks import (
    TASKS,
    TOLERANCE,
    Example,
    answer_in,
    make_babi,
    make_babilong,
    make_mqar,
    make_niah,
    score,
)
from titans.tasks.babilong import DEFAULT_FACTS, MIN_FACTS

HAYSTACK = """The morning was grey and the harbour lay still under a low sky. Fishing boats rocked at \
their moorings, and gulls circled above the market. An old man sat on the sea wall, mending a net with \
patient hands.

Down the lane the baker had opened his shutters. The smell of bread drifted over the cobbles! Children ran \
past with satchels on their backs, late for school again. Was it the bell they heard, or only the wind?

When the tide turned the water crept back over the sand
and the little crabs hurried into the weed
while the clouds went slowly out to sea
and the lamps were lit along the quay

"We shall have rain before noon," said the harbourmaster. Nobody answered him. The ferry sounded its horn \
twice and pulled away from the pier, its wake spreading in long white lines across the bay.

In the café by the church two sisters argued about a letter — neither would say who had written it. \
The waiter brought coffee and pretended not to listen. Outside, a cart loaded with barrels rattled by.

By evening the rain had come and gone. The streets shone under the lamps, and the smell of wet stone rose \
from the gutters. Somewhere a dog barked at nothing. The town settled into sleep, and the sea kept talking \
to itself in the dark."""

BOUNDARY_BEFORE = re.compile(r"(?:[.!?][\"')\]]*\s+|\n\s*)\Z")
NIAH_CASES = [("single_1", {}), ("single_2", {}), ("single_3", {}), ("single_2", {"n_keys": 4}),
              ("single_3", {"n_values": 3}), ("single_2", {"n_keys": 3, "n_values": 2, "n_queries": 2})]


class WordTokenizer:
    """A tokenizer double: words, punctuation marks and whitespace runs are tokens."""

    kind = "word"

    def encode(self, text: str) -> list[int]:
        return [0] * len(re.findall(r"\w+|[^\w\s]|\s+", text))


def n_bytes(ex: Example) -> int:
    return len(ex.prompt.encode("utf-8"))


def check_inserted(context: str, sentences: list[str], offsets: list[int]) -> None:
    """Each sentence sits at its offset, after a sentence end or line start, followed by whitespace."""
    for sentence, off in zip(sentences, offsets):
        assert context[off:off + len(sentence)] == sentence
        assert off == 0 or BOUNDARY_BEFORE.search(context[:off]), repr(context[max(0, off - 40):off])
        end = off + len(sentence)
        assert end == len(context) or context[end].isspace()


def remove_inserted(context: str, sentences: list[str], offsets: list[int]) -> str:
    """The filler: the context without the inserted sentences and the separator each brought."""
    for sentence, off in sorted(zip(sentences, offsets), key=lambda x: -x[1]):
        end = off + len(sentence)
        if end == len(context):  # inserted at the very end: " sentence"
            context = context[:off - 1]
        else:  # "sentence " or "sentence\n"
            context = context[:off] + context[end + 1:]
    return context


# ---------------------------------------------------------------------------------------- niah


@pytest.mark.parametrize("kind,counts", NIAH_CASES)
def test_niah_is_deterministic_and_seeded(kind, counts):
    a = make_niah(kind, 2000, 0.3, haystack=HAYSTACK, seed=5, **counts)
    assert a == make_niah(kind, 2000, 0.3, haystack=HAYSTACK, seed=5, **counts)
    b = make_niah(kind, 2000, 0.3, haystack=HAYSTACK, seed=6, **counts)
    assert a.meta["needles"] != b.meta["needles"] and a.answer != b.answer


@pytest.mark.parametrize("kind,counts", NIAH_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_niah_needles_sit_at_sentence_boundaries_of_the_real_filler(kind, counts, seed):
    ex = make_niah(kind, 3000, None, haystack=HAYSTACK, seed=seed, **counts)
    meta = ex.meta
    n_needles = meta.get("n_keys", len(meta["keys"])) * len(next(iter(meta["values"].values())))
    assert len(meta["needles"]) == len(meta["needle_offsets"]) == n_needles
    check_inserted(ex.context, meta["needles"], meta["needle_offsets"])
    filler = remove_inserted(ex.context, meta["needles"], meta["needle_offsets"])
    source, joiner = (("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
                       "again.", " ") if kind == "single_1" else (HAYSTACK, "\n\n"))
    stream = (source + joiner) * (len(filler) // len(source) + 2)
    assert stream[meta["haystack_offset"]:].startswith(filler)
    assert meta["haystack_cycled"] is True  # 3000 bytes > the fixture text


def test_niah_answers():
    ex = make_niah("single_1", 1000, 0.5, seed=3)
    value = ex.answer.strip()
    assert re.fullmatch(r"\d{5}", value) and ex.answer == " " + value
    assert ex.meta["needles"] == [f"The pass key is {value}. Remember it. {value} is the pass key."]
    assert ex.question == "\nQuestion: What is the pass key?\nAnswer:" and ex.task == "niah_single_1"
    ex = make_niah("single_2", 1000, 0.5, haystack=HAYSTACK, seed=3)
    (key,) = ex.meta["keys"]
    assert re.fullmatch(r" \d{7}", ex.answer) and key in ex.question and "number" in ex.question
    assert ex.meta["needles"] == [f"One of the special magic numbers for {key} is: {ex.answer.strip()}."]
    ex = make_niah("single_3", 1000, 0.5, haystack=HAYSTACK, seed=3)
    assert re.fullmatch(r" [0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", ex.answer)
    assert ex.task == "niah_single_3" and "uuid" in ex.question


def test_niah_multikey_distractors_are_distinct_and_only_the_query_is_answered():
    ex = make_niah("single_2", 2000, 0.5, haystack=HAYSTACK, seed=1, n_keys=4)
    keys, values = ex.meta["keys"], ex.meta["values"]
    assert ex.task == "niah_multikey" and len(set(keys)) == 4
    flat = [v for k in keys for v in values[k]]
    assert len(set(flat)) == 4 and all(v in ex.context for v in flat)
    (query,) = ex.meta["query_keys"]
    assert query in ex.question and all(k not in ex.question for k in keys if k != query)
    assert ex.answer == " " + values[query][0]
    assert score(ex, ex.answer) and not any(score(ex, " " + values[k][0]) for k in keys if k != query)


def test_niah_multivalue_and_multiquery_need_every_value():
    ex = make_niah("single_2", 2000, 0.5, haystack=HAYSTACK, seed=2, n_values=4)
    assert ex.task == "niah_multivalue" and "all the special magic numbers" in ex.question
    answers = ex.meta["answers"]
    (key,) = ex.meta["keys"]
    assert sorted(answers) == sorted(ex.meta["values"][key]) and len(set(answers)) == 4
    offsets = dict(zip(ex.meta["needles"], ex.meta["needle_offsets"]))
    needle = "One of the special magic numbers for {} is: {}."
    in_context_order = sorted(answers, key=lambda v: offsets[needle.format(key, v)])
    assert answers == in_context_order and ex.answer == " " + ", ".join(answers)
    assert score(ex, ex.answer) and score(ex, " " + " and ".join(reversed(answers)) + ".")
    assert not score(ex, " " + ", ".join(answers[:3]))
    ex = make_niah("single_3", 3000, 0.5, haystack=HAYSTACK, seed=2, n_keys=3, n_values=2, n_queries=2)
    assert ex.task == "niah_multiquery_uuid" and len(ex.meta["answers"]) == 4
    q1, q2 = ex.meta["query_keys"]
    assert f"{q1} and {q2}?" in ex.question
    assert ex.meta["answers"][:2] == sorted(ex.meta["values"][q1], key=ex.context.index)
    assert set(ex.meta["answers"]) == set(ex.meta["values"][q1] + ex.meta["values"][q2])


@pytest.mark.parametrize("length", [1000, 16_000, 1_000_000])
def test_lengths_within_tolerance_and_fast(length):
    for make in (lambda: make_niah("single_2", length, 0.5, haystack=HAYSTACK, seed=0),
                 lambda: make_niah("single_1", length, 0.5, seed=0),
                 lambda: make_babilong(3, length, haystack=HAYSTACK, seed=0)):
        start = time.perf_counter()
        ex = make()
        elapsed = time.perf_counter() - start
        assert length - TOLERANCE <= n_bytes(ex) <= length and ex.meta["length_tokens"] == n_bytes(ex)
        assert elapsed < 2.0, f"{ex.task} at {length} tokens took {elapsed:.2f} s"
    if length > 2 * len(HAYSTACK):
        assert ex.meta["haystack_cycled"] and ex.meta["haystack_passes"] > 1


def test_lengths_with_other_tokenizers():
    tok = WordTokenizer()
    ex = make_niah("single_2", 16_000, 0.5, haystack=HAYSTACK, tokenizer=tok, seed=0)
    assert 16_000 - TOLERANCE <= len(tok.encode(ex.prompt)) == ex.meta["length_tokens"] <= 16_000
    bpe = train_bpe([HAYSTACK], 512, log=lambda _: None)
    ex = make_babilong(2, 8000, haystack=HAYSTACK, tokenizer=bpe, seed=0)
    assert 8000 - TOLERANCE <= len(bpe.encode(ex.prompt)) == ex.meta["length_tokens"] <= 8000


def _padded_verse() -> str:
    """Verse whose every 10th line ends in a long run of spaces and a line number, as in the
    Paradise Lost text: a word-boundary cut inside the run loses the whole run, so from some start
    offsets no cut lands within the tolerance of the target length."""
    words = HAYSTACK.split()
    lines = [" ".join(words[(7 * i) % len(words):(7 * i) % len(words) + 6]) for i in range(2000)]
    return "\n".join(line + (" " * 70 + str(i + 1) if (i + 1) % 10 == 0 else "")
                     for i, line in enumerate(lines))


def test_fitting_moves_its_start_when_a_padded_line_skips_the_target():
    verse = _padded_verse()
    for seed in range(60):
        ex = make_niah("single_2", 1008, (seed % 10) / 10, haystack=verse, seed=seed)
        assert 1008 - TOLERANCE <= n_bytes(ex) <= 1008, (seed, n_bytes(ex))
        start = ex.meta["haystack_offset"]
        assert ex.context[:20] == verse[start:start + 20] or ex.context.startswith(ex.meta["needles"][0])


def test_a_long_enough_haystack_is_not_cycled():
    ex = make_niah("single_2", 1000, 0.5, haystack=HAYSTACK, seed=4)
    assert not ex.meta["haystack_cycled"] and ex.meta["haystack_passes"] < 1
    assert ex.meta["filler"] == "haystack"


@pytest.mark.parametrize("kind", ["single_1", "single_2"])
def test_depth_placement(kind):
    for length in (1000, 16_000):
        first = make_niah(kind, length, 0.0, haystack=HAYSTACK, seed=1)
        assert first.meta["needle_offsets"] == [0] and first.context.startswith(first.meta["needles"][0])
        middle = make_niah(kind, length, 0.5, haystack=HAYSTACK, seed=1)
        filler = remove_inserted(middle.context, middle.meta["needles"], middle.meta["needle_offsets"])
        assert abs(middle.meta["needle_offsets"][0] - len(filler) / 2) < 100  # the nearest sentence start
        last = make_niah(kind, length, 1.0, haystack=HAYSTACK, seed=1)
        end = last.meta["needle_offsets"][0] + len(last.meta["needles"][0])
        assert len(last.context) - end < 250  # at most the sentence the filler was cut in


def test_score_and_answer_in():
    ex = make_niah("single_1", 1000, 0.5, seed=0)
    value = ex.answer.strip()
    assert score(ex, ex.answer) and score(ex, value) and score(ex, value + " is")
    assert score(ex, f"  {value}.\nQuestion")
    assert not score(ex, " 12345" if value != "12345" else " 54321")
    assert not score(ex, " " + value + "1") and not score(ex, " 1" + value) and not score(ex, "")
    assert not score(ex, f" the key is {value}")  # the answer must come first
    assert answer_in(["12", "34"], "34 and 12") and not answer_in(["12", "34"], "34 and 123")
    with pytest.raises(ValueError, match="list"):
        answer_in("12", "12")


@pytest.mark.parametrize("call,match", [
    (lambda: make_niah("single_4", 1000, 0.5), "kind must be one of"),
    (lambda: make_niah("single_1", 0, 0.5), "length must be an int >= 1, got 0"),
    (lambda: make_niah("single_1", 1000, 1.5), "depth must be a float in"),
    (lambda: make_niah("single_1", 1000, 0.5, seed=-1), "seed must be"),
    (lambda: make_niah("single_1", 1000, 0.5, n_keys=2), "n_keys, n_values and n_queries must be 1"),
    (lambda: make_niah("single_2", 1000, 0.5), r"\(kind='single_2'\): haystack must be .* got NoneType"),
    (lambda: make_niah("single_3", 1000, 0.5, haystack="  \n"), "haystack must be .* got a blank str"),
    (lambda: make_niah("single_2", 1000, 0.5, haystack=HAYSTACK, n_keys=2, n_queries=3),
     r"n_queries must be an int in \[1, 2\], got 3"),
    (lambda: make_niah("single_2", 60, 0.5, haystack=HAYSTACK), "length=60 is too short"),
    (lambda: make_babi(6), "qa must be an int in 1..5"),
    (lambda: make_babi(4, 0, 6), r"n_facts \(for QA4\) must be an int in \[1, 5\], got 6"),
    (lambda: make_babi(3, 0, 2), r"n_facts \(for QA3\) must be an int in \[3, 10000\], got 2"),
    (lambda: make_babilong(1, 1000, haystack=None), "haystack must be"),
    (lambda: make_babilong(1, 100, haystack=HAYSTACK, n_facts=10), "length=100 is too short"),
    (lambda: make_babilong(1, 1000, haystack=HAYSTACK, tokenizer="byte"), "tokenizer must be a"),
    (lambda: TASKS["babilong_qa1"](1000, haystack=HAYSTACK, seed=0, depth=2), "depth must be"),
])
def test_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------- bAbI

MOVE = re.compile(r"(\w+) (?:went|journeyed|travelled|moved|went back) to the (\w+)\.")
TAKE = re.compile(r"(\w+) (?:picked up|got|grabbed|took) the (\w+)(?: there)?\.")
DROP = re.compile(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)(?: there)?\.")
GIVE = re.compile(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.")
RELATION = re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def resolve(facts: list[str], question: str) -> str:
    """Answer a bAbI question from the fact sentences alone (a reader's view of the story)."""
    where, holder, lying, gives, relations = {}, {}, {}, [], set()
    trace = defaultdict(list)  # the locations each object has been seen in, in order
    for fact in facts:
        if m := MOVE.fullmatch(fact):
            person, place = m.groups()
            where[person] = place
            for obj in [o for o, h in holder.items() if h == person]:
                trace[obj].append(place)
        elif m := TAKE.fullmatch(fact):
            person, obj = m.groups()
            holder[obj] = person
            if not trace[obj] or trace[obj][-1] != where[person]:  # KeyError: taker never placed
                trace[obj].append(where[person])
        elif m := DROP.fullmatch(fact):
            person, obj = m.groups()
            assert holder[obj] == person
            holder[obj], lying[obj] = None, where[person]
        elif m := GIVE.fullmatch(fact):
            giver, obj, receiver = m.groups()
            assert holder[obj] == giver
            holder[obj] = receiver
            gives.append((giver, obj, receiver))
        elif m := RELATION.fullmatch(fact):
            a, d, b = m.groups()
            relations |= {(a, d, b), (b, OPPOSITE[d], a)}
        else:
            raise AssertionError(f"unparsed fact {fact!r}")

    def one(found):
        assert len(found) == 1, found
        return found[0]

    def latest(match):
        return next(g for g in reversed(gives) if match(*g))

    if m := re.fullmatch(r"Where is ([A-Z]\w+)\?", question):
        return where[m[1]]
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return where[holder[m[1]]] if holder[m[1]] else lying[m[1]]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        seen = trace[m[1]]
        assert seen.count(m[2]) == 1 and seen.index(m[2]) > 0, (seen, m[2])
        return seen[seen.index(m[2]) - 1]
    if m := re.fullmatch(r"What is (north|south|east|west) of the (\w+)\?", question):
        return one([a for a, d, b in relations if (d, b) == (m[1], m[2])])
    if m := re.fullmatch(r"What is the (\w+) (north|south|east|west) of\?", question):
        return one([b for a, d, b in relations if (a, d) == (m[1], m[2])])
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", question):
        return latest(lambda g, o, r: (o, r) == (m[1], m[2]))[0]
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", question):
        return latest(lambda g, o, r: (g, r) == (m[1], m[2]))[1]
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", question):
        return latest(lambda g, o, r: (g, o) == (m[1], m[2]))[2]
    if m := re.fullmatch(r"Who received the (\w+)\?", question):
        return latest(lambda g, o, r: o == m[1])[2]
    if m := re.fullmatch(r"Who gave the (\w+)\?", question):
        return latest(lambda g, o, r: o == m[1])[0]
    raise AssertionError(f"unparsed question {question!r}")


@pytest.mark.parametrize("qa", [1, 2, 3, 4, 5])
def test_babi_answers_match_an_independent_reader(qa):
    questions, answers = set(), set()
    not_current = 0  # QA3: questions about a location other than the object's last one
    for seed in range(300):
        n_facts = [MIN_FACTS[qa], DEFAULT_FACTS[qa], 5 + seed % 40][seed % 3] if qa != 4 else 1 + seed % 5
        facts, question, answer = make_babi(qa, seed, n_facts)
        assert len(facts) == n_facts and re.fullmatch(r"[a-z]+|[A-Z][a-z]+", answer)
        assert resolve(facts, question) == answer, (facts, question, answer)
        questions.add(re.sub(r"[A-Z]\w+|the \w+", "X", question))
        answers.add(answer)
        if qa == 3:
            obj, place = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question).groups()
            last = [MOVE.fullmatch(f)[2] for f in facts if MOVE.fullmatch(f)]
            not_current += place != answer and place != last[-1]
    assert len(answers) >= 4  # not degenerate
    assert len(questions) >= {1: 1, 2: 1, 3: 1, 4: 2, 5: 5}[qa]  # QA4 and QA5 ask every question form
    assert qa != 3 or not_current > 10


def test_babi_is_deterministic_and_seeded():
    for qa in range(1, 6):
        assert make_babi(qa, 7) == make_babi(qa, 7)
        assert make_babi(qa, 7) != make_babi(qa, 8)
    assert make_babi(1, 0)[0] != make_babi(2, 0)[0][:DEFAULT_FACTS[1]]


@pytest.mark.parametrize("qa", [1, 2, 3, 4, 5])
def test_babilong_scatters_the_story_in_order(qa):
    ex = make_babilong(qa, 6000, haystack=HAYSTACK, seed=11)
    facts, question, answer = make_babi(qa, 11)
    assert ex.meta["facts"] == facts and ex.task == f"babilong_qa{qa}"
    assert ex.question == f"\nQuestion: {question}\nAnswer:" and ex.answer == " " + answer
    offsets = ex.meta["fact_offsets"]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    check_inserted(ex.context, facts, offsets)
    assert 6000 - TOLERANCE <= n_bytes(ex) <= 6000
    assert ex == make_babilong(qa, 6000, haystack=HAYSTACK, seed=11)
    if len(facts) >= 10:  # spread over the whole context, not bunched
        assert ex.meta["fact_depths"][0] < 0.3 and ex.meta["fact_depths"][-1] > 0.7
    assert score(ex, ex.answer) and score(ex, answer + ".") and not score(ex, " nowhere")


# ------------------------------------------------------------------------------------- registry


def test_registry_makes_every_task():
    assert set(TASKS) >= {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey",
                          "niah_multivalue", *(f"babilong_qa{qa}" for qa in range(1, 6))}
    tok = ByteTokenizer()
    for name, make in TASKS.items():
        ex = make(2048, haystack=HAYSTACK, tokenizer=tok, seed=3, depth=0.25)
        assert ex.task == name and 2048 - TOLERANCE <= n_bytes(ex) <= 2048
        assert score(ex, ex.answer) and ex.meta["answers"]


# ------------------------------------------------------------------------------------- MQAR


def test_mqar_layout():
    B, T, N, Q, V = 16, 128, 8, 5, 64
    inputs, targets = make_mqar(B, T, N, vocab_size=V, n_queries=Q, seed=0)
    assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.long
    keys, values = inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for b in range(B):
        pairs = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert len(pairs) == N and len(set(values[b].tolist())) == N
        (where,) = torch.nonzero(targets[b] != -100, as_tuple=True)
        assert len(where) == Q and (where >= 2 * N).all() and (where < T - 1).all()
        asked = inputs[b, where].tolist()
        assert len(set(asked)) == Q and set(asked) <= set(pairs)
        for t in where.tolist():
            assert targets[b, t] == pairs[inputs[b, t].item()] == inputs[b, t + 1]
        rest = inputs[b, 2 * N:].clone()
        rest[where - 2 * N] = 0
        rest[where + 1 - 2 * N] = 0
        assert (rest == 0).all()  # filler is the reserved id 0


def test_mqar_defaults_determinism_and_errors():
    inputs, targets = make_mqar(4, 64, 6, vocab_size=100)
    assert ((targets != -100).sum(dim=1) == 6).all()  # every key queried once by default
    same = make_mqar(4, 64, 6, vocab_size=100)
    assert torch.equal(inputs, same[0]) and torch.equal(targets, same[1])
    assert not torch.equal(inputs, make_mqar(4, 64, 6, vocab_size=100, seed=1)[0])
    tight = make_mqar(2, 24, 6, vocab_size=14)  # 6 keys from [1, 7), all query slots used
    assert ((tight[1] != -100).sum(dim=1) == 6).all()
    for kwargs, match in [({"seq_len": 23}, r"seq_len must be >= 2 \* n_pairs .* = 24 .*got 23"),
                          ({"vocab_size": 12}, r"n_pairs must be <= 5"),
                          ({"n_queries": 7}, r"n_queries must be an int in \[1, 6\], got 7"),
                          ({"batch": 0}, "batch must be"), ({"seed": -1}, "seed must be")]:
        args = {"batch": 2, "seq_len": 24, "n_pairs": 6, "vocab_size": 14, **kwargs}
        with pytest.raises(ValueError, match=match):
            make_mqar(args.pop("batch"), args.pop("seq_len"), args.pop("n_pairs"), **args)
