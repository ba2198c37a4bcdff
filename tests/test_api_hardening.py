"""The HTTP and WebSocket surface under hostile input, against a real uvicorn on 127.0.0.1: a deterministic
schemathesis run over /openapi.json that must find no 5xx. Every wait is bounded."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

import vstream
from test_server import DEADLINE_S, KEY, running_server
from vstream.server import create_app
from vstream.server.state import Limits
from vstream.synth.clips import write_test_video

AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_body_bytes=4096, max_answer_tokens=8, max_question_chars=100, max_running=1,
                max_frame_pixels=200 * 200, max_source_seconds=5, max_source_frames=30, max_fps=5, url_timeout_s=2)


@pytest.fixture(scope="module")
def model():
    return vstream.load("tiny")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_test_video(root / "small.mp4", seconds=3, fps=5, size=(160, 120))
    return root


@pytest.fixture(scope="module")
def strict(model, media):
    """A server with a key, a media root and small limits."""
    app = create_app(model, media_root=media, api_key=KEY, max_streams=3, limits=LIMITS)
    with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
        yield client, app


def _fuzz(client, max_examples: int) -> tuple[int, list]:
    """Generated requests for every operation of /openapi.json, the same ones on every run (derandomized):
    (calls made, the 5xx answers)."""
    base = str(client.base_url).rstrip("/")
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            nonlocal calls
            response = case.call(base_url=base, headers=AUTH, timeout=DEADLINE_S)
            calls += 1
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, case.query, case.body, response.status_code,
                                 response.text[:200]))

        check()
    for sid in [s["id"] for s in client.get("/v1/streams").json()["data"]]:
        client.delete(f"/v1/streams/{sid}")
    return calls, failures


def test_schemathesis_finds_no_server_error(strict):
    calls, failures = _fuzz(strict[0], max_examples=6)
    assert calls >= 30 and failures == []
