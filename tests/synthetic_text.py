"""A small English-like corpus generated in the test process: the same bytes on every host.

Tests that train a model need text whose statistics a tiny model can learn only in part, and
their verdict must not depend on which files happen to be installed (the host's stdlib source
differs between Python builds) or on the Python version's ``random`` algorithms. Here a
pseudo-word lexicon (syllables), Zipf-like word frequencies, a loose grammar and numbers are all
driven by a 64-bit linear congruential generator written out in integers.
"""

from __future__ import annotations

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "st", "tr", "ch", "sh", "th", "pl", "gr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "nd", "st", "ck"]
_FUNCTION_WORDS = ["the", "a", "of", "and", "to", "in", "is", "that", "for", "it", "with", "as", "on", "by", "not", "or"]
_LEXICON_SIZE = 1200


class _Lcg:
    """Knuth's MMIX LCG; ``below(n)`` takes the high bits, which have the longest period."""

    def __init__(self, seed: int):
        self.state = (seed * 2862933555777941757 + 3037000493) % 2**64

    def below(self, n: int) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % 2**64
        return (self.state >> 33) % n

    def pick(self, words: list[str]) -> str:
        return words[self.below(len(words))]

    def zipf(self, n: int) -> int:
        # min of two uniform draws, applied twice: frequent low indices, a long tail.
        return self.below(self.below(self.below(n) + 1) + 1)


def _lexicon() -> list[str]:
    rng = _Lcg(12345)  # one lexicon for every seed: train and held-out text share the language
    words = []
    for _ in range(_LEXICON_SIZE):
        n_syllables = 1 + rng.below(3)
        words.append("".join(rng.pick(_ONSETS) + rng.pick(_VOWELS) + rng.pick(_CODAS) for _ in range(n_syllables)))
    return words


def _sentence(rng: _Lcg, lexicon: list[str]) -> str:
    words = []
    for position in range(4 + rng.below(11)):
        kind = rng.below(10)
        if kind < 3:
            words.append(_FUNCTION_WORDS[rng.zipf(len(_FUNCTION_WORDS))])
        elif kind == 3 and position > 0:
            words.append(str(rng.below(2000)))
        else:
            words.append(lexicon[rng.zipf(len(lexicon))])
        if rng.below(12) == 0 and position > 1:
            words[-1] += ","
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + rng.pick([".", ".", ".", "?", "!"])


def synthetic_text(n_chars: int, seed: int) -> str:
    """``n_chars`` characters of sentences and paragraphs in one made-up language; different seeds
    give different text of the same statistics (one seed for training, another for held-out)."""
    rng = _Lcg(seed)
    lexicon = _lexicon()
    parts: list[str] = []
    total = 0
    while total < n_chars:
        sentence = _sentence(rng, lexicon) + ("\n\n" if rng.below(6) == 0 else " ")
        parts.append(sentence)
        total += len(sentence)
    return "".join(parts)[:n_chars]
