"""The synthetic summarisation world: posts, an exact oracle, mixed-quality writers, comparisons.

It keeps the structure of the paper's TL;DR setting (PAPER.md, "Controlled setting") at a size a
laptop trains on in minutes, and stays readable by a person:

    post:    my landlord raised the rent . the deposit was late and my roommate ignored the bills .
    summary: my landlord raised the rent and deposit

* **Posts** are a few sentences over a vocabulary of real English words in topics (rent, work,
  pets, ...): nouns from one main topic and a secondary one, verbs, determiners, connectives.
  Post `i` of a world depends only on `(seed, i)`, so every split and size agrees on it.
* **The oracle** scores a summary given its post: it covers the post's salient nouns, stays
  short, invents no nouns absent from the post, does not repeat itself and follows a small word
  grammar (fluency). Preferences between two summaries are Bradley-Terry draws on the score
  difference with a tunable temperature (label noise). The oracle is exact and cheap, so a study
  can report how a learned golden model itself is being exploited.
* **Writers** are stochastic heuristic summarisers of quality `q` in [0, 1]: low-quality ones
  drop salient words, ramble, invent and repeat words and scramble the word order.

Over-optimisation is possible by construction: quality correlates with length (up to the cap)
and with covering many post nouns, so a model fit on finite pairs can be fooled by summaries
that are long or stuffed with post nouns - exactly what the oracle penalises.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

TOPICS = {
    "rent": "landlord rent lease apartment deposit repairs neighbor heating mold roommate bills "
            "kitchen",
    "work": "boss job salary promotion coworker meeting deadline overtime contract interview "
            "office manager",
    "pets": "dog cat vet leash puppy kitten shelter training toys barking food walks",
    "travel": "flight hotel passport luggage airport visa train beach booking delay tour map",
    "health": "doctor sleep diet exercise pain clinic therapy insurance stress medicine gym "
              "weight",
    "money": "loan debt savings budget credit bank taxes card payment interest income fees",
    "family": "parents sister brother wedding holiday kids cousin grandma dinner argument gift "
              "visit",
    "school": "exam teacher grades homework class college tuition essay lecture campus project "
              "friends",
}
TOPICS = {topic: words.split() for topic, words in TOPICS.items()}
NOUNS = sorted({w for words in TOPICS.values() for w in words})
VERBS = ("raised missed changed ignored wants hates needs broke lost found asked paid cancelled "
         "delayed helped forgot").split()
DETERMINERS = "my the our his her".split()
CONNECTIVES = "and but so with after about".split()
PERIOD = "."
WORDS = (*NOUNS, *VERBS, *DETERMINERS, *CONNECTIVES, PERIOD)
TLDR = "TL;DR:"

# The word grammar fluency is judged by: which word class may follow which.
_CLASS = {**{w: "N" for w in NOUNS}, **{w: "V" for w in VERBS},
          **{w: "D" for w in DETERMINERS}, **{w: "C" for w in CONNECTIVES}, PERIOD: "."}
_ALLOWED = {("D", "N"), ("N", "V"), ("V", "D"), ("V", "N"), ("N", "C"), ("C", "D"), ("C", "N")}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    min_sentences: int = 3
    max_sentences: int = 5
    key_words: int = 3  # Salient nouns a good summary covers.
    max_summary_words: int = 8  # Longer summaries lose score per extra word.
    label_temperature: float = 0.25  # Bradley-Terry temperature on score differences.


@dataclasses.dataclass(frozen=True)
class Post:
    words: tuple[str, ...]
    key_words: tuple[str, ...]  # Salient nouns, most salient first.

    @property
    def text(self) -> str:
        return " ".join(self.words)


def pick(rng: np.random.Generator, items):
    """`rng.choice(items)` for a sequence, drawing the same number from the same stream without
    converting `items` to an array (the world's texts make hundreds of thousands of draws)."""
    return items[int(rng.integers(0, len(items)))]


def make_post(world: WorldConfig, index: int) -> Post:
    """Post `index` of the world: deterministic in (seed, index)."""
    rng = np.random.default_rng([world.seed, index, 1])
    main, second = rng.choice(sorted(TOPICS), 2, replace=False)
    words: list[str] = []
    for _ in range(rng.integers(world.min_sentences, world.max_sentences + 1)):
        def noun():
            return pick(rng, TOPICS[main] if rng.random() < 0.7 else TOPICS[second])
        sentence = [pick(rng, DETERMINERS), noun(), pick(rng, VERBS), pick(rng, DETERMINERS),
                    noun()]
        if rng.random() < 0.5:
            sentence += [pick(rng, CONNECTIVES), pick(rng, DETERMINERS), noun()]
        words += [str(w) for w in sentence] + [PERIOD]
    return Post(tuple(words), salient_nouns(words, world.key_words))


def salient_nouns(words, k: int) -> tuple[str, ...]:
    """The k most frequent nouns, ties broken by first appearance."""
    nouns = [w for w in words if _CLASS.get(w) == "N"]
    order = {w: i for i, w in reversed(list(enumerate(nouns)))}
    ranked = sorted(set(nouns), key=lambda w: (-nouns.count(w), order[w]))
    return tuple(ranked[:k])


def oracle_score(world: WorldConfig, post_words, summary_words) -> float:
    """Exact quality of a summary given its post (higher is better, about -3 .. 1.6)."""
    summary = [w for w in summary_words if w != PERIOD]
    if not summary:
        return -2.0
    post_nouns = {w for w in post_words if _CLASS.get(w) == "N"}
    keys = salient_nouns(post_words, world.key_words)
    nouns = [w for w in summary if _CLASS.get(w) == "N"]
    coverage = len(set(keys) & set(nouns)) / max(len(keys), 1)
    invented = sum(1 for w in nouns if w not in post_nouns)
    unknown = sum(1 for w in summary if w not in _CLASS)
    repeated = len(nouns) - len(set(nouns))
    too_long = max(0, len(summary) - world.max_summary_words)
    too_short = max(0, 3 - len(summary))
    pairs = list(zip(summary, summary[1:], strict=False))
    fluency = (sum((_CLASS.get(a), _CLASS.get(b)) in _ALLOWED for a, b in pairs) / len(pairs)
               if pairs else 0.0)
    return (1.0 * coverage + 0.6 * fluency - 0.4 * invented - 0.4 * unknown - 0.3 * repeated
            - 0.15 * too_long - 0.3 * too_short)


def preference_probability(world: WorldConfig, score_a: float, score_b: float) -> float:
    """Bradley-Terry P(a preferred to b)."""
    return 1.0 / (1.0 + math.exp(-(score_a - score_b) / world.label_temperature))


def write_summary(post: Post, quality: float, rng: np.random.Generator) -> list[str]:
    """A heuristic writer of the given quality in [0, 1]."""
    verbs = [w for w in post.words if _CLASS[w] == "V"]
    others = [w for w in dict.fromkeys(post.words) if _CLASS[w] == "N" and w not in post.key_words]
    keep = [w for w in post.key_words if rng.random() < 0.35 + 0.65 * quality]
    if not keep:
        keep = [post.key_words[0]] if rng.random() < quality + 0.3 else list(others[:1])
    # The well-formed shape: "my K1 VERB the K2 and K3 ...".
    words = [pick(rng, DETERMINERS)]
    for i, noun in enumerate(keep):
        if i == 1:
            words += [pick(rng, verbs) if verbs else "changed", pick(rng, DETERMINERS)]
        elif i > 1:
            words += [pick(rng, CONNECTIVES)]
        words.append(noun)
    sloppiness = 1.0 - quality
    extra = rng.poisson(4.0 * sloppiness)  # Rambling: more post nouns and filler.
    for _ in range(extra):
        words += [pick(rng, CONNECTIVES), pick(rng, others or post.key_words)]
    if rng.random() < 0.5 * sloppiness:  # Invent a noun the post never mentions.
        words.insert(int(rng.integers(0, len(words) + 1)), pick(rng, NOUNS))
    if rng.random() < 0.4 * sloppiness:  # Repeat a word.
        words.insert(int(rng.integers(0, len(words) + 1)), pick(rng, words))
    if rng.random() < 0.6 * sloppiness:  # Scramble part of the order.
        i, j = sorted(rng.integers(0, len(words), 2))
        words[i:j + 1] = list(rng.permutation(words[i:j + 1]))
    return words


def writer_quality(rng: np.random.Generator) -> float:
    """A mix of writers like TL;DR's policy mix: mostly middling, some good, some poor."""
    return float(np.clip(rng.beta(2.0, 2.0), 0.0, 1.0))


def prompt_text(post: Post) -> str:
    return f"{post.text} {TLDR}"


def post_words_from_prompt(prompt: str) -> list[str]:
    words = prompt.split()
    return words[:-1] if words and words[-1] == TLDR else words


@dataclasses.dataclass(frozen=True)
class Comparison:
    post_index: int
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float


def make_comparison(world: WorldConfig, index: int) -> Comparison:
    """Two writers summarise post `index`; the oracle's Bradley-Terry draw labels them."""
    post = make_post(world, index)
    rng = np.random.default_rng([world.seed, index, 2])
    a = write_summary(post, writer_quality(rng), rng)
    b = write_summary(post, writer_quality(rng), rng)
    score_a, score_b = (oracle_score(world, post.words, s) for s in (a, b))
    a_wins = rng.random() < preference_probability(world, score_a, score_b)
    (win, s_win), (lose, s_lose) = ((a, score_a), (b, score_b))[:: 1 if a_wins else -1]
    return Comparison(index, prompt_text(post), " ".join(win), " ".join(lose), s_win, s_lose)


def make_demonstration(world: WorldConfig, index: int) -> tuple[str, str]:
    """(prompt, summary) by one writer of random quality: SFT data."""
    post = make_post(world, index)
    rng = np.random.default_rng([world.seed, index, 3])
    return prompt_text(post), " ".join(write_summary(post, writer_quality(rng), rng))


def corpus(world: WorldConfig, num_posts: int):
    """Text for training the tokenizer: posts, summaries, and every word at least once."""
    yield " ".join(WORDS) + f" {TLDR}"
    for i in range(num_posts):
        comparison = make_comparison(world, i)
        yield comparison.prompt
        yield comparison.chosen
        yield comparison.rejected
