"""`vstream serve --ray` options: each wrong combination is refused before anything starts (no Ray, no model), with a
message naming what was expected and what came."""

from __future__ import annotations

import pytest

from helpers import in_process


@pytest.mark.parametrize(("args", "message"), [
    (["--replicas", "2"], "--replicas need --ray"),
    (["--autoscale", "1:3", "--ray-address", "auto"], "--autoscale, --ray-address need --ray"),
    (["--ray"], "--ray needs --state-dir DIR"),
    (["--ray", "--state-dir", "{tmp}", "--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--ray", "--state-dir", "{tmp}", "--replicas", "2", "--autoscale", "1:2"], "exclude each other"),
    (["--ray", "--state-dir", "{tmp}", "--autoscale", "3:1"], "MIN:MAX with 1 <= MIN <= MAX (replicas), got '3:1'"),
    (["--ray", "--state-dir", "{tmp}", "--autoscale", "two"], "got 'two'"),
    (["--ray", "--state-dir", "{tmp}", "--replica-threads", "0"], "--replica-threads must be >= 1"),
])
def test_bad_cluster_options_are_refused_before_anything_starts(monkeypatch, capsys, tmp_path, args, message):
    code, _, err = in_process(monkeypatch, capsys, "serve", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in err, err
