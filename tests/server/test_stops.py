"""StopScanner against the plain definition: the text cut before the earliest stop sequence,
however the text is split into streamed pieces."""

from __future__ import annotations

import random

import pytest

from llamactl.server.stops import StopScanner


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def scan(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(p) for p in pieces)
    return out + scanner.flush(), scanner.hit is not None


@pytest.mark.parametrize("seed", range(200))
def test_any_split_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 40)))
    stops = ["".join(rng.choice("ab c\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 4))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert scan(pieces, stops) == reference(text, stops)


def test_held_back_tail_is_released_only_when_safe() -> None:
    scanner = StopScanner(["</end>"])
    assert scanner.feed("Hello </e") == "Hello "  # "</e" may begin the stop sequence
    assert scanner.feed("xtra") == "</extra"  # it did not
    assert scanner.feed(" bye</en") == " bye"
    assert scanner.feed("d> never sent") == "" and scanner.hit == "</end>"
    assert scanner.feed("more") == "" and scanner.flush() == ""


def test_earliest_stop_wins_and_no_stops_pass_everything() -> None:
    scanner = StopScanner(["world", "lo w"])
    assert scanner.feed("hello world") == "hel" and scanner.hit == "lo w"
    plain = StopScanner([])
    assert plain.feed("abc") == "abc" and plain.flush() == ""
