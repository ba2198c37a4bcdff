"""Answer normalisation for exact-match scoring, and accuracy per question type.

Two normalisations, for two kinds of answer. `normalise_keep_word_breaks` is the procedural world's exact match
("Red-Circle." -> "red circle"): punctuation becomes a space, so hyphenated or run-together words still split where
the answer splits. `normalise_drop_punctuation` is the benchmarks' (offline judge, reading an option's text in a
multiple-choice answer): punctuation is deleted ("red-circle" -> "redcircle", "don't" -> "dont") and every article goes.
They differ on purpose; each keeps the scores its callers have always reported.

This module does not judge open-ended answers (see `vstream.eval.judges`) and reads no files.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable

_ARTICLES = ("a", "an", "the")


def normalise_keep_word_breaks(text: str) -> str:
    """Lower case; every character other than a-z, 0-9 and space becomes a space; single spaces; one leading article
    dropped. "The Red-Circle." -> "red circle"."""
    text = re.sub(r"[^a-z0-9 ]", " ", text.lower())
    return re.sub(r"^(the|a|an) ", "", " ".join(text.split()))


def normalise_drop_punctuation(text: str) -> str:
    """Lower case; ASCII punctuation deleted; every article dropped; single spaces. "The red-circle" -> "redcircle"."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(word for word in text.split() if word not in _ARTICLES)


def accuracy_by_type(rows: Iterable[dict], right: str) -> dict[str, float]:
    """{type: fraction of rows with `row[right]` true, ..., "overall": over all rows}, keys sorted; a row's type is
    `row["type"]`."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_type[row["type"]].append(row[right])
        by_type["overall"].append(row[right])
    return {kind: sum(hits) / len(hits) for kind, hits in sorted(by_type.items())}
