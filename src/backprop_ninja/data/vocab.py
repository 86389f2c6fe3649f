"""The vocabulary: the sorted characters of the data, after the start/end token 0.

One correction to the lectures: the start/end token is index 0 and is *not* a character of the
data, so a '.' inside a word (e.g. "st. john") stays an ordinary character.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from backprop_ninja.errors import UserError

END_TOKEN = 0  # starts every context and ends every word; not a character of the data


@dataclass(frozen=True)
class Vocabulary:
    """The sorted characters of the data; index 0 is the start/end token, characters are 1..len."""

    chars: tuple[str, ...]

    @classmethod
    def from_words(cls, words: list[str]) -> "Vocabulary":
        return cls(tuple(sorted(set("".join(words)))))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    @cached_property
    def stoi(self) -> dict[str, int]:
        return {ch: i + 1 for i, ch in enumerate(self.chars)}

    def encode(self, word: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[ch] for ch in word]
        except KeyError as err:
            raise UserError(f"character {err.args[0]!r} of {word!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """Token ids -> text; the end token (and anything after it) is not printed."""
        out = []
        for i in ids:
            i = int(i)
            if i == END_TOKEN:
                break
            out.append(self.chars[i - 1])
        return "".join(out)

    def display(self, i: int) -> str:
        """How the lecture prints one token: '.' for the end token."""
        return "." if i == END_TOKEN else self.chars[i - 1]
