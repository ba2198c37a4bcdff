"""Answer normalisation and accuracy per type (vstream.eval.scoring): the two normalisations differ where their
docstrings say."""

import pytest

from vstream.eval.scoring import accuracy_by_type, normalise_drop_punctuation, normalise_keep_word_breaks


@pytest.mark.parametrize(("text", "kept", "dropped"), [
    ("The Red-Circle.", "red circle", "redcircle"),
    ("  a   blue square ", "blue square", "blue square"),
    ("it's the one", "it s the one", "its one"),
    ("", "", ""),
])
def test_the_two_normalisations(text, kept, dropped):
    assert normalise_keep_word_breaks(text) == kept
    assert normalise_drop_punctuation(text) == dropped


def test_accuracy_by_type_counts_every_row_once_in_its_type_and_overall():
    rows = [{"type": "spatial", "ok": True}, {"type": "spatial", "ok": False}, {"type": "abstract", "ok": True}]
    assert accuracy_by_type(rows, "ok") == {"abstract": 1.0, "overall": 2 / 3, "spatial": 0.5}
    assert accuracy_by_type([], "ok") == {}
