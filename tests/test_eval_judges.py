"""Judges: reply parsing, the LLM judge against a real OpenAI-compatible server on 127.0.0.1 (malformed replies,
timeouts, server errors, retries), failure counting, the offline judge with the real MiniLM model, letter parsing."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vstream.eval.judges import (
    PROMPT_SHA256, JudgeReplyError, OfflineJudge, OpenAIJudge, parse_choice, parse_judge_reply,
)
from vstream.eval.report import score_predictions, summarize

GOOD = '{"pred": "yes", "score": 4}'


class ScriptedJudge(BaseHTTPRequestHandler):
    """Replies by the tag in the question: [ok] [dict] [loose] [no] [bad] [slow] [500] [401] [nojson]."""

    attempts: dict = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        assert self.path == "/v1/chat/completions" and body["temperature"] == 0
        assert self.headers["authorization"] == "Bearer sk-test"
        user = body["messages"][1]["content"]
        tag = user[user.index("[") + 1 : user.index("]")]
        with self.lock:
            n = self.attempts[tag] = self.attempts.get(tag, 0) + 1
        if tag == "slow" and n == 1:
            time.sleep(1.0)  # beyond the judge's timeout: the retry gets a good reply
        if tag == "500" and n <= 2:
            return self.reply(500, "overloaded")
        if tag == "401":
            return self.reply(401, "bad key")
        if tag == "nojson":
            return self.reply(200, "<html>oops</html>", raw=True)
        content = {"ok": GOOD, "slow": GOOD, "500": GOOD, "dict": "Sure: {'pred': 'no', 'score': 1}",
                   "loose": "pred: Yes\nscore: 3.5 because it matches", "no": '{"pred": "no", "score": 0}',
                   "bad": "I cannot decide."}[tag]
        self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}))

    def reply(self, status, text, raw=False):
        data = text.encode()
        self.send_response(status)
        self.send_header("content-type", "text/html" if raw else "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def server():
    ScriptedJudge.attempts = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def judge_at(url, **kw):
    return OpenAIJudge(url, "judge-1", "sk-test", timeout=0.4, retries=2, backoff=0.01, concurrency=3, **kw)


@pytest.mark.parametrize("text,expected", [
    (GOOD, ("yes", 4.0)),
    ("{'pred': 'yes', 'score': 4.8}", ("yes", 4.8)),
    ("Here you go:\n```json\n{\"pred\": \"NO\", \"score\": \"2\"}\n```", ("no", 2.0)),
    ("pred = no; score = 0", ("no", 0.0)),
])
def test_judge_replies_are_read_in_several_shapes(text, expected):
    assert parse_judge_reply(text) == expected


@pytest.mark.parametrize("text", ["yes it is right", '{"pred": "maybe", "score": 3}', '{"pred": "yes", "score": 9}',
                                  '{"pred": "yes"}', ""])
def test_unreadable_judge_replies_raise(text):
    with pytest.raises(JudgeReplyError):
        parse_judge_reply(text)


def test_llm_judge_retries_and_counts_failures(server):
    judge = judge_at(server)
    tags = ["ok", "dict", "loose", "no", "bad", "slow", "500", "401", "nojson"]
    verdicts = judge.judge_many([(f"[{t}] what?", "a cup", "the cup") for t in tags])
    got = {t: (v.status, v.pred, v.score, v.attempts) for t, v in zip(tags, verdicts)}
    assert got["ok"] == ("ok", "yes", 4.0, 1)
    assert got["dict"] == ("ok", "no", 1.0, 1)
    assert got["loose"] == ("ok", "yes", 3.5, 1)
    assert got["slow"] == ("ok", "yes", 4.0, 2)  # the first attempt timed out
    assert got["500"] == ("ok", "yes", 4.0, 3)  # two server errors, then an answer
    assert got["bad"][:2] == ("failed", None) and got["bad"][3] == 3  # bounded: 1 + 2 retries
    assert got["401"] == ("failed", None, None, 1)  # not retried: it cannot succeed
    assert got["nojson"][0] == "failed"
    assert "unreadable reply" in verdicts[tags.index("bad")].error
    assert ScriptedJudge.attempts["bad"] == 3 and ScriptedJudge.attempts["401"] == 1


def test_failed_judgments_stay_in_the_denominators_and_are_retried_next_run(server, tmp_path):
    records = [{"id": str(i), "question": f"[{t}] q{i}", "answer": "a", "pred": "b", "kind": "open", "qtype": "x",
                "latency": {"answer_s": 0.1}, "position": 1.0} for i, t in enumerate(["ok", "no", "bad", "bad"])]
    judge = judge_at(server)
    outcomes = score_predictions(records, judge, tmp_path)
    run = {"benchmark": "t", "mode": "offline", "model": "tiny", "source": "video"}
    results = summarize(records, outcomes, run, judge.describe())
    o = results["overall"]
    assert (o["n"], o["correct"], o["failed"], o["accuracy"], o["accuracy_if_failed_correct"]) == (4, 1, 2, 0.25, 0.75)
    assert o["score"] == pytest.approx(4 / 4) and o["score_of_judged"] == pytest.approx(4 / 2)
    assert results["not_correct_by_status"] == {"failed": ["2", "3"]}
    assert results["judge"]["model"] == "judge-1" and results["judge"]["prompt_sha256"] == PROMPT_SHA256
    assert results["judge"]["date"]
    before = dict(ScriptedJudge.attempts)
    score_predictions(records, judge, tmp_path)  # only the two failures are asked again
    assert ScriptedJudge.attempts["ok"] == before["ok"] and ScriptedJudge.attempts["bad"] == before["bad"] + 6


@pytest.fixture(scope="module")
def offline_judge():
    judge = OfflineJudge()
    judge.embed(["warm up"])
    return judge


def test_offline_judge_with_minilm(offline_judge):
    verdicts = offline_judge.judge_many([
        ("q", "The red car.", "the red car"),  # exact after normalising
        ("q", "a man is playing a guitar", "someone plays the guitar"),
        ("q", "a man is playing a guitar", "a bowl of soup on a table"),
        ("q", "two", ""),
    ])
    assert [(v.status, v.pred) for v in verdicts] == [("ok", "yes"), ("ok", "yes"), ("ok", "no"), ("ok", "no")]
    assert verdicts[0].score == 5.0 and verdicts[1].score > verdicts[2].score
    assert "NOT comparable" in offline_judge.describe()["label"]


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("(C)", "C"), ("D. a bowl", "D"), ("B) the cat", "B"), ("The answer is C.", "C"),
    ("answer: (b)", None), ("Option D is correct", "D"), ("I think (B) fits best", "B"), ("C, because", "C"),
    ("a bowl of soup", "B"), ("A man walks", None), ("A or B", None), ("(A) or (B)", None), ("", None),
    ("E", None), ("sat on the chair", "A"),
])
def test_choice_letters_are_parsed_or_left_unparsable(text, letter):
    assert parse_choice(text, ("sat on the chair", "a bowl of soup", "the cat", "the dog")) == letter


def test_unparsable_choices_are_wrong_and_counted(tmp_path):
    records = [{"id": str(i), "kind": "choice", "answer": "B", "options": ["x", "y", "z"], "pred": p, "qtype": "t",
                "latency": {}, "position": None} for i, p in enumerate(["B", "(A)", "no idea", "Y"])]
    outcomes = score_predictions(records, None, tmp_path)
    results = summarize(records, outcomes, {"benchmark": "m", "mode": "offline", "model": "tiny", "source": "video"},
                        None)
    assert results["overall"] == {"n": 4, "correct": 2, "accuracy": 0.5, "unparsable": 1}
    assert results["not_correct_by_status"] == {"unparsable": ["2"]}
