"""WordNet 3.0 noun glosses labelled by lexicographer supersense, from Debian's
``wordnet-base`` (``/usr/share/wordnet/data.noun``; ``dpkg -L wordnet-base`` lists it).

Each synset line of ``data.noun`` reads (WordNet's wndb(5) format)

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [pointers] | gloss

and ``lex_filenum`` names the lexicographer file, i.e. the supersense (lexnames(5):
03 noun.Tops ... 28 noun.time, 26 noun supersenses). The gloss is the definition with
its example sentences, as WordNet writes it. Lines that start with two spaces are the
licence header.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

__all__ = ["SUPERSENSES", "Gloss", "noun_glosses", "supersense_dataset", "DEFAULT_PATH"]

DEFAULT_PATH = Path("/usr/share/wordnet/data.noun")

#: Noun lexicographer files by number (WordNet's lexnames(5)).
SUPERSENSES = {
    3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body",
    9: "cognition", 10: "communication", 11: "event", 12: "feeling", 13: "food",
    14: "group", 15: "location", 16: "motive", 17: "object", 18: "person",
    19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity",
    24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time",
}


class Gloss(NamedTuple):
    """One noun synset: its byte offset (WordNet's id), supersense, words and gloss."""

    offset: int
    supersense: str
    words: tuple[str, ...]
    gloss: str


def _path(path: str | Path | None) -> Path:
    chosen = Path(path or os.environ.get("GATELAB_WORDNET") or DEFAULT_PATH)
    if not chosen.is_file():
        raise FileNotFoundError(
            f"WordNet noun data not found at {chosen}. Install Debian's wordnet-base "
            "(apt-get install wordnet-base, which puts it at /usr/share/wordnet/data.noun), "
            "or pass path=... or set GATELAB_WORDNET to a WordNet 3.0 data.noun file.")
    return chosen


def _parse(line: str, where: str) -> Gloss:
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    try:
        if not sep or fields[2] != "n":
            raise ValueError
        offset, lex, count = int(fields[0]), int(fields[1]), int(fields[3], 16)
        words = tuple(fields[4 + 2 * i] for i in range(count))
        supersense = SUPERSENSES[lex]
    except (ValueError, IndexError, KeyError):
        raise ValueError(f"{where}: not a WordNet noun synset line (offset lex_filenum n "
                         f"w_cnt words ... | gloss): {line[:80]!r}") from None
    return Gloss(offset, supersense, words, gloss.strip())


def noun_glosses(path: str | Path | None = None) -> list[Gloss]:
    """Every noun synset of ``data.noun`` (default: ``GATELAB_WORDNET`` or
    ``/usr/share/wordnet/data.noun``), in file order. A missing file raises
    FileNotFoundError saying how to install it; a malformed line, ValueError naming it."""
    source = _path(path)
    out = []
    with open(source, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue  # licence header
            out.append(_parse(line.rstrip("\n"), f"{source}, line {number}"))
    return out


def supersense_dataset(min_count: int = 770, path: str | Path | None = None
                       ) -> tuple[list[str], list[int], list[str]]:
    """Glosses of the supersenses with at least ``min_count`` synsets (20 of the 26 at
    the default 770): (texts, labels, names), labels indexing ``names`` (sorted)."""
    glosses = noun_glosses(path)
    counts = Counter(g.supersense for g in glosses)
    names = sorted(s for s, c in counts.items() if c >= min_count)
    index = {s: i for i, s in enumerate(names)}
    kept = [g for g in glosses if g.supersense in index]
    return [g.gloss for g in kept], [index[g.supersense] for g in kept], names
