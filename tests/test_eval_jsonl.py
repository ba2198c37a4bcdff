"""The resumable JSON-lines files of an evaluation run (vstream.eval.jsonl): one corruption policy for predictions and
judgments alike."""

import json

import pytest

from vstream.errors import DataError
from vstream.eval.jsonl import read_jsonl_by_id, trim_partial_line


def test_a_missing_file_reads_as_empty(tmp_path):
    assert read_jsonl_by_id(tmp_path / "none.jsonl") == {}


def test_later_lines_win_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"id": "a", "v": 1}) + "\n\n" + json.dumps({"id": "a", "v": 2}) + "\n")
    assert read_jsonl_by_id(path) == {"a": {"id": "a", "v": 2}}


def test_a_last_line_cut_by_an_interruption_is_dropped_and_trimmed(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "pr')
    assert read_jsonl_by_id(path) == {"a": {"id": "a"}}
    trim_partial_line(path)
    assert path.read_text() == json.dumps({"id": "a"}) + "\n"


def test_a_bad_line_before_the_last_names_the_file_and_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\nnot json\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(DataError, match=r"j\.jsonl: line 2 of 3 is not JSON"):
        read_jsonl_by_id(path)
