"""Synthetic long-context tasks written from the RULER paper's definitions (no downloads).

Each generator returns a Sample: a chat-formatted prompt of at most `length` tokens of the
model's own tokenizer (answer prefix appended after the template, as RULER does), the
reference strings and how they are scored. Haystacks that RULER takes from Paul Graham's
essays use seeded sentences from wonderwords' word lists here ("words" haystack), so the
scores are comparable between methods on one model, not with published RULER numbers.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable, Protocol

REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], tokenize: bool = ..., add_generation_prompt: bool = ...) -> str: ...


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    answers: tuple[str, ...]
    max_new_tokens: int
    metric: str = "all"  # RULER's string_match_all; "part" = string_match_part
    turn: int = 0  # multi-turn: the turn this prompt ends with
    meta: dict = field(default_factory=dict, compare=False)


def _word_lists() -> tuple[list[str], list[str], list[str]]:
    import importlib.resources

    def load(name: str) -> list[str]:
        text = importlib.resources.files("wonderwords.assets").joinpath(name).read_text()
        return sorted({w.strip().lower() for w in text.split() if w.strip().isalpha()})

    return load("nounlist.txt"), load("adjectivelist.txt"), load("verblist.txt")


_WORDS: tuple[list[str], list[str], list[str]] | None = None


def words() -> tuple[list[str], list[str], list[str]]:
    """(nouns, adjectives, verbs), lower case, sorted."""
    global _WORDS
    if _WORDS is None:
        _WORDS = _word_lists()
    return _WORDS


def _key(rng: random.Random) -> str:
    nouns, adjectives, _ = words()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _sentence(rng: random.Random) -> str:
    nouns, adjectives, verbs = words()
    return f"The {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)}s the {rng.choice(adjectives)} {rng.choice(nouns)}."


def chat_prompt(tokenizer: Tokenizer, task: str, answer_prefix: str) -> str:
    """The task as one user turn, generation prompt added, then the answer prefix."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": task}], tokenize=False, add_generation_prompt=True)
    return text + answer_prefix


def fit(build: Callable[[int], str], tokenizer: Tokenizer, max_prompt_tokens: int, upper: int) -> int:
    """The largest n in [1, upper] whose prompt build(n) fits max_prompt_tokens tokens.

    RULER grows its haystack step by step; a binary search over the same size finds the
    same largest fit in log steps (prompt length grows with n).
    """
    lo, hi = 1, upper
    if len(tokenizer.encode(build(lo))) > max_prompt_tokens:
        raise ValueError(f"length {max_prompt_tokens} is too short for this task's template")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(build(mid))) <= max_prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- needle in a haystack -------------------------------------------------------------

NIAH_TEMPLATE = (
    "Some special magic {type} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type} afterwards.\n{context}\n"
    "What are all the special magic {type} for {query} mentioned in the provided text?"
)
NIAH_ANSWER = " The special magic {type} for {query} mentioned in the provided text are"


def _singular(text: str) -> str:
    # RULER's rewrite when exactly one value is asked for
    for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(a, b)
    return text


def niah(
    name: str, haystack: str, num_keys: int = 1, num_values: int = 1, num_queries: int = 1, max_new_tokens: int = 128
) -> Callable[[random.Random, Tokenizer, int], Sample]:
    """A RULER NIAH task: `haystack` is repeat (the grass is green...), needle (distractor
    needles with other keys) or words (seeded random sentences, standing in for essays)."""
    num_keys = max(num_keys, num_queries)

    def make(rng: random.Random, tokenizer: Tokenizer, length: int) -> Sample:
        keys = [_key(rng) for _ in range(num_keys)]
        values = [[_number(rng) for _ in range(num_values)] for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        queried = rng.sample(range(num_keys), num_queries)
        query = ", ".join(keys[i] for i in queried[:-1]) + (", and " if num_queries > 1 else "") + keys[queried[-1]]
        answers = tuple(v for i in queried for v in values[i])
        fill_rng_seed = rng.random()
        positions_seed = rng.random()

        def build(n: int) -> str:
            fill = random.Random(fill_rng_seed)
            if haystack == "repeat":
                sentences = [REPEAT] * n
            elif haystack == "needle":
                sentences = [f"One of the special magic numbers for {_key(fill)} is: {_number(fill)}." for _ in range(n)]
            else:
                sentences = [_sentence(fill) for _ in range(n)]
            where = random.Random(positions_seed)
            for needle in needles:
                sentences.insert(where.randint(0, len(sentences)), needle)
            template, prefix, kind = NIAH_TEMPLATE, NIAH_ANSWER, "numbers"
            if num_values * num_queries == 1:
                template, prefix, kind = _singular(template), _singular(prefix), "number"
            context = ("\n" if haystack != "repeat" else " ").join(sentences)
            return chat_prompt(tokenizer, template.format(type=kind, context=context, query=query),
                               prefix.format(type=kind, query=query))

        prompt = build(fit(build, tokenizer, length - max_new_tokens, upper=length))
        return Sample(name, prompt, answers, max_new_tokens)

    return make


# --- variable tracking ------------------------------------------------------------------

VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {num} variables are "
             "assgined the value {query}, they are: ")


def _variable_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str], str]:
    names: set[str] = set()
    while len(names) < hops + 1:
        names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(letters)))
    order = list(names)
    rng.shuffle(order)
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {order[0]} = {value}"] + [f"VAR {order[i + 1]} = VAR {order[i]} " for i in range(hops)]
    return lines, order, value


def variable_tracking(hops: int = 4, max_new_tokens: int = 30) -> Callable[[random.Random, Tokenizer, int], Sample]:
    def chain_text(rng: random.Random, lines: list[str], n: int) -> str:
        noise = [REPEAT] * n
        spots = sorted(rng.randint(0, n) for _ in lines)
        for offset, (spot, line) in enumerate(zip(spots, lines)):
            noise.insert(spot + offset, line)
        return " ".join(noise)

    def make(rng: random.Random, tokenizer: Tokenizer, length: int) -> Sample:
        lines, names, value = _variable_chain(rng, hops, 5)
        ex_lines, ex_names, ex_value = _variable_chain(rng, hops, 3)
        seed = rng.random()
        example = (VT_TEMPLATE.format(context=chain_text(random.Random(seed), ex_lines, 8), query=ex_value)
                   + VT_ANSWER.format(num=hops + 1, query=ex_value) + " ".join(ex_names))

        def build(n: int) -> str:
            task = VT_TEMPLATE.format(context=chain_text(random.Random(seed), lines, n), query=value)
            return chat_prompt(tokenizer, example + "\n\n" + task, VT_ANSWER.format(num=hops + 1, query=value))

        prompt = build(fit(build, tokenizer, length - max_new_tokens, upper=length))
        return Sample("vt", prompt, tuple(names), max_new_tokens)

    return make


# --- common / frequent words ------------------------------------------------------------

CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"


def common_words(max_new_tokens: int = 120, common: int = 10) -> Callable[[random.Random, Tokenizer, int], Sample]:
    def listing(chosen: list[str], common_reps: int, rare_reps: int, rng: random.Random) -> str:
        items = [w for w in chosen[:common] for _ in range(common_reps)] + [w for w in chosen[common:] for _ in range(rare_reps)]
        rng.shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    def make(rng: random.Random, tokenizer: Tokenizer, length: int) -> Sample:
        nouns, adjectives, verbs = words()
        pool = sorted(set(nouns + adjectives + verbs))
        rng.shuffle(pool)
        short = length < 4096
        common_reps, rare_reps = (6, 1) if short else (30, 3)
        seed = rng.random()
        example_words = pool[:20] if short else pool[:40]
        example = (CWE_TEMPLATE.format(context=listing(example_words, 3 if short else 10, 1 if short else 3, random.Random(seed)))
                   + CWE_ANSWER + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_words[:common])))
        task_pool = pool[len(example_words):]

        def build(n: int) -> str:
            task = CWE_TEMPLATE.format(context=listing(task_pool[: common + n], common_reps, rare_reps, random.Random(seed)))
            return chat_prompt(tokenizer, example + "\n\n" + task, CWE_ANSWER)

        prompt = build(fit(build, tokenizer, length - max_new_tokens, upper=min(len(task_pool) - common, length)))
        return Sample("cwe", prompt, tuple(task_pool[:common]), max_new_tokens)

    return make


FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
                "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"


def frequent_words(alpha: float = 2.0, max_new_tokens: int = 50) -> Callable[[random.Random, Tokenizer, int], Sample]:
    def make(rng: random.Random, tokenizer: Tokenizer, length: int) -> Sample:
        vocab = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(max(8, length // 50))})
        rng.shuffle(vocab)
        vocab[0] = "..."
        zeta = sum(k ** -alpha for k in range(1, 10_000))
        seed = rng.random()

        def build(n: int) -> str:
            items = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k ** -alpha / zeta))]
            random.Random(seed).shuffle(items)
            return chat_prompt(tokenizer, FWE_TEMPLATE.format(context=" ".join(items)), FWE_ANSWER)

        prompt = build(fit(build, tokenizer, length - max_new_tokens, upper=4 * length))
        return Sample("fwe", prompt, tuple(vocab[1:4]), max_new_tokens)

    return make


# --- multi-turn ---------------------------------------------------------------------------

MT_TEMPLATE = ("Below is a list of records. Each record gives the special magic number of a key. Memorize them: I will "
               "ask you about several keys, one at a time.\n{context}")
MT_QUESTION = "What is the special magic number for {key}?"
MT_ANSWER = "The special magic number for {key} is {value}."


def multi_turn(turns: int = 4, max_new_tokens: int = 24) -> Callable[[random.Random, Tokenizer, int], list[Sample]]:
    """Several questions over one long shared context, turn after turn (RocketKV-MT's use):
    turn i's prompt is the context, the earlier questions with their reference answers, and
    question i, so consecutive turns share a growing prefix (prefix caching)."""

    def make(rng: random.Random, tokenizer: Tokenizer, length: int) -> list[Sample]:
        keys = [_key(rng) for _ in range(turns)]
        values = [_number(rng) for _ in keys]
        records_seed, where_seed = rng.random(), rng.random()

        def context(n: int) -> str:
            fill = random.Random(records_seed)
            records = [f"The special magic number for {_key(fill)} is {_number(fill)}." for _ in range(n)]
            where = random.Random(where_seed)
            for k, v in zip(keys, values):
                records.insert(where.randint(0, len(records)), f"The special magic number for {k} is {v}.")
            return MT_TEMPLATE.format(context="\n".join(records))

        def messages(ctx: str, turn: int) -> list[dict]:
            out = []
            for i in range(turn + 1):
                question = MT_QUESTION.format(key=keys[i])
                out.append({"role": "user", "content": (ctx + "\n\n" + question) if i == 0 else question})
                if i < turn:
                    out.append({"role": "assistant", "content": MT_ANSWER.format(key=keys[i], value=values[i])})
            return out

        def render(ctx: str, turn: int) -> str:
            text = tokenizer.apply_chat_template(messages(ctx, turn), tokenize=False, add_generation_prompt=True)
            return text + f"The special magic number for {keys[turn]} is"

        # the last turn, with every earlier question and answer, is the longest prompt
        ctx = context(fit(lambda n: render(context(n), turns - 1), tokenizer, length - max_new_tokens, upper=length))
        return [Sample("multi_turn", render(ctx, t), (values[t],), max_new_tokens, turn=t) for t in range(turns)]

    return make


SINGLE_TURN_TASKS: dict[str, Callable[[random.Random, Tokenizer, int], Sample]] = {
    "niah_single": niah("niah_single", "repeat"),
    "niah_multikey": niah("niah_multikey", "needle"),
    "niah_multivalue": niah("niah_multivalue", "words", num_values=4),
    "niah_multiquery": niah("niah_multiquery", "words", num_queries=4),
    "vt": variable_tracking(),
    "cwe": common_words(),
    "fwe": frequent_words(),
}
TASKS = (*SINGLE_TURN_TASKS, "multi_turn")


def make_samples(task: str, tokenizer: Tokenizer, length: int, num_samples: int, seed: int = 42) -> list[Sample]:
    """num_samples seeded samples of a task at `length` tokens (multi_turn: every turn of each)."""
    out: list[Sample] = []
    for i in range(num_samples):
        rng = random.Random(f"{seed}-{task}-{length}-{i}")
        if task == "multi_turn":
            out.extend(multi_turn()(rng, tokenizer, length))
        elif task in SINGLE_TURN_TASKS:
            out.append(SINGLE_TURN_TASKS[task](rng, tokenizer, length))
        else:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return out


def postprocess(text: str) -> str:
    """RULER's clean-up of a prediction: control characters become newlines."""
    return "".join("\n" if ord(c) < 32 else c for c in text.strip()).strip()


def score(sample: Sample, prediction: str) -> float:
    """RULER's string_match_all (fraction of references found) or string_match_part (any), x100."""
    text = postprocess(prediction).lower()
    found = [ref.lower() in text for ref in sample.answers]
    if sample.metric == "part":
        return 100.0 * any(found)
    return 100.0 * sum(found) / len(found)
