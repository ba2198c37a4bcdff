# size: one reader per published benchmark format, each with its own checks; they share the validation helpers
"""Benchmarks in their published formats, read into one validated list of `Question`s.

Every record is checked: a missing or mistyped field, a duplicate id, or a video (or feature file) that is not on disk
raises `DatasetError` naming the file, the record and the field. Nothing is substituted and nothing is skipped.

Formats (the `BENCHMARKS` table names the default question file of each):
- open-ended, as distributed with Flash-VStream's evaluation (`test_qa*.json`): a list of
  `{video_id, question, id, answer, answer_type?, duration?}` (VS-Ego, VS-Movie, ActivityNet-QA, MSVD-QA, MSRVTT-QA,
  NExT-OE, and vstream's own generated sets);
- RVS-Ego / RVS-Movie: the same records, whose `video_id` names a clip cut from a longer video so that it ends at the
  question; their `end_time` (seconds, or `shot_N` for MovieNet keyframes) is in the time of the original video, and
  the clip list (`rvs_ego.json`: `{video_id, original_video, start_time, end_time}`) gives the clip's start;
- multiple choice: EgoSchema (`q_uid`, `question`, `option 0`..`option 4`, `answer` 0-4 or a separate answers file),
  MVBench (`json/<task>.json`: `video`, `question`, `candidates`, `answer` = the right candidate's text) and Video-MME
  (`videoID`, `question_id`, `question`, `options` = ["A. ...", ...], `answer` = letter, `duration`, `domain`, ...).

Question times. A record's `time` (or `timestamp`) field, in seconds from the video's start, is when the question is
asked in a stream; RVS records take theirs from `end_time` and the clip list. Without one, a question is asked at the
end of its video. This module reads files only; it decodes no video.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vstream.errors import DataError
from vstream.eval.features import VIDEO_EXTENSIONS, feature_name

LETTERS = "ABCDEFGHIJ"
CHOICE_INSTRUCTION = "Answer with the letter of the correct option only."


class DatasetError(DataError):
    """A benchmark file or record that does not match its format, or a video/feature file that is missing."""


@dataclass(frozen=True)
class Question:
    """One question, normalised across formats."""

    id: str
    """Unique within the benchmark."""
    video: str
    """The video's name in the data (a file name or an id); resolved to a file by `Benchmark.video_path`."""
    question: str
    """The question as written in the data (for multiple choice, without the options)."""
    answer: str
    """Open-ended: the reference answer. Multiple choice: the correct letter."""
    kind: str
    """`open` or `choice`."""
    qtype: str | None = None
    """Question type (`answer_type`, `task_type`, ...) for the per-type tables."""
    time: float | None = None
    """Seconds from the video's start when the question is asked; None = at the end of the video."""
    options: tuple[str, ...] = ()
    """Multiple choice: the option texts, in letter order."""
    meta: dict = field(default_factory=dict, compare=False)
    """Other published fields kept for the reports (duration, domain, ...)."""

    def prompt(self) -> str:
        """The text the model is asked: the question, and for multiple choice the lettered options."""
        if self.kind != "choice":
            return self.question
        lines = [f"({LETTERS[i]}) {text}" for i, text in enumerate(self.options)]
        return "\n".join([self.question, *lines, CHOICE_INSTRUCTION])


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's questions are and how its records read."""

    format: str
    """`open`, `rvs`, `egoschema`, `mvbench` or `videomme`."""
    qa_files: tuple[str, ...]
    """Question files tried in `--data` (first existing wins); for mvbench a folder of per-task files."""
    clips: str | None = None
    """RVS: the clip list file name."""
    group_by_first_letter: bool = False
    """NExT-OE: also report accuracy by the type's first letter (C/T/D: causal, temporal, descriptive)."""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "vs-ego": BenchmarkSpec("open", ("test_qa_ego4d.json", "test_qa.json")),
    "vs-movie": BenchmarkSpec("open", ("test_qa_movienet.json", "test_qa.json")),
    "rvs-ego": BenchmarkSpec("rvs", ("test_qa_ego4d.json", "test_qa.json"), clips="rvs_ego.json"),
    "rvs-movie": BenchmarkSpec("rvs", ("test_qa_movienet.json", "test_qa.json"), clips="rvs_movie.json"),
    "actnet": BenchmarkSpec("open", ("test_qa.json",)),
    "msvd": BenchmarkSpec("open", ("test_qa.json",)),
    "msrvtt": BenchmarkSpec("open", ("test_qa.json",)),
    "nextoe": BenchmarkSpec("open", ("test_qa.json",), group_by_first_letter=True),
    "open": BenchmarkSpec("open", ("test_qa.json",)),
    "egoschema": BenchmarkSpec("egoschema", ("test_qa.json", "questions.json")),
    "mvbench": BenchmarkSpec("mvbench", ("json",)),
    "videomme": BenchmarkSpec("videomme", ("test_qa.json",)),
}


@dataclass
class Benchmark:
    """A validated benchmark: its questions and where their videos or feature files are."""

    name: str
    spec: BenchmarkSpec
    questions: list[Question]
    qa_file: Path
    videos_dir: Path | None
    features_dir: Path | None

    @property
    def kind(self) -> str:
        return "choice" if self.spec.format in ("egoschema", "mvbench", "videomme") else "open"

    def video_path(self, video: str) -> Path:
        return _video_file(self.videos_dir, video)

    def feature_path(self, video: str) -> Path:
        return self.features_dir / feature_name(video)


def load_benchmark(
    name: str, data: str | Path, *, qa_file: str | Path | None = None, videos: str | Path | None = None,
    features: str | Path | None = None, limit: int | None = None, originals: bool = False,
) -> Benchmark:
    """Read and validate benchmark `name` from folder `data`.

    `qa_file` overrides the question file; videos are looked up in `videos` (default `data/videos`) unless `features`
    names a folder of feature files. Every question's video or feature file must exist. `limit` keeps the first N
    questions (after validating all of them). `originals` (RVS with a clip list): ask every question on the original
    long video at its `end_time`, so that one stream carries all the questions of a video."""
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark {name!r}: expected one of {sorted(BENCHMARKS)}")
    spec, data = BENCHMARKS[name], Path(data)
    if not data.is_dir():
        raise DatasetError(f"--data must be a folder holding the {name} files, got {data}")
    path = Path(qa_file) if qa_file is not None else _first_existing(data, spec.qa_files, name)
    reader = {"open": _read_open, "rvs": _read_open, "egoschema": _read_egoschema, "mvbench": _read_mvbench,
              "videomme": _read_videomme}[spec.format]
    if originals and (spec.format != "rvs" or not (data / spec.clips).exists()):
        raise DatasetError(f"originals needs an RVS benchmark and its clip list {spec.clips} in {data}")
    questions = _read_open(path, data, spec, originals) if spec.format == "rvs" else reader(path, data, spec)
    _check_unique(questions, path)
    videos_dir = None if features is not None else Path(videos) if videos is not None else data / "videos"
    bench = Benchmark(name, spec, questions, path, videos_dir, Path(features) if features is not None else None)
    _check_files(bench)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"limit must be >= 1, got {limit}")
        bench.questions = bench.questions[:limit]
    return bench


# ---------------------------------------------------------------- files


def _first_existing(data: Path, names: tuple[str, ...], benchmark: str) -> Path:
    for candidate in names:
        if (data / candidate).exists():
            return data / candidate
    raise DatasetError(f"{data} holds none of {list(names)}: expected the {benchmark} question file (or pass --qa)")


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise DatasetError(f"{path} does not exist: expected a JSON question file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a non-empty JSON list of records, got {type(data).__name__} "
                           f"of length {len(data) if hasattr(data, '__len__') else '-'}")
    return data


def _video_file(videos_dir: Path, video: str) -> Path:
    """`videos_dir/video` when it names a file with a video extension, else `videos_dir/video.<ext>` (first found)."""
    direct = videos_dir / video
    if direct.suffix.lower() in VIDEO_EXTENSIONS and direct.is_file():
        return direct
    for ext in VIDEO_EXTENSIONS:
        candidate = videos_dir / (video + ext)
        if candidate.is_file():
            return candidate
    raise DatasetError(f"no video file for {video!r} in {videos_dir}: expected {video} or {video}.<"
                       f"{'|'.join(e[1:] for e in VIDEO_EXTENSIONS)}>")


def _check_files(bench: Benchmark) -> None:
    seen: set[str] = set()
    for q in bench.questions:
        if q.video in seen:
            continue
        seen.add(q.video)
        if bench.features_dir is not None:
            if not bench.feature_path(q.video).is_file():
                raise DatasetError(f"{bench.qa_file}: record {q.id!r}, field video: feature file "
                                   f"{bench.feature_path(q.video)} does not exist")
        else:
            try:
                bench.video_path(q.video)
            except DatasetError as e:
                raise DatasetError(f"{bench.qa_file}: record {q.id!r}, field video: {e}") from None


def _check_unique(questions: list[Question], path: Path) -> None:
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise DatasetError(f"{path}: duplicate id {q.id!r}: expected every question id once")
        seen.add(q.id)


# ---------------------------------------------------------------- field checks


class _Record:
    """One record with checked accessors whose errors name the file, the record and the field."""

    def __init__(self, path: Path, index: int, raw):
        self.path, self.index = path, index
        if not isinstance(raw, dict):
            raise DatasetError(f"{path}: record {index}: expected a JSON object, got {type(raw).__name__}")
        self.raw = raw
        self.label = f"record {index}"

    def fail(self, key: str, expected: str) -> DatasetError:
        got = repr(self.raw[key]) if key in self.raw else "no such field"
        return DatasetError(f"{self.path}: {self.label}, field {key!r}: expected {expected}, got {got}")

    def text(self, *keys: str, allow_number: bool = False) -> str:
        key = next((k for k in keys if k in self.raw), keys[0])
        value = self.raw.get(key)
        if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "a non-empty string" + (" or a number" if allow_number else ""))
        return value.strip()

    def ident(self, *keys: str) -> str:
        key = next((k for k in keys if k in self.raw), keys[0])
        value = self.raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
            raise self.fail(key, "a non-empty string or integer id")
        return str(value).strip()

    def optional_text(self, *keys: str) -> str | None:
        key = next((k for k in keys if k in self.raw), None)
        return None if key is None or self.raw[key] is None else self.text(key, allow_number=True)

    def seconds(self, key: str) -> float:
        value = self.raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self.fail(key, "a number of seconds >= 0")
        return float(value)

    def time(self) -> float | None:
        present = [k for k in ("time", "timestamp") if self.raw.get(k) is not None]
        if len(present) > 1:
            raise self.fail("timestamp", "one of 'time' and 'timestamp', not both")
        return self.seconds(present[0]) if present else None


def _meta(rec: _Record, keys: tuple[str, ...]) -> dict:
    return {k: rec.raw[k] for k in keys if k in rec.raw}


# ---------------------------------------------------------------- open-ended


def _read_open(path: Path, data: Path, spec: BenchmarkSpec, originals: bool = False) -> list[Question]:
    clips = _read_clips(data / spec.clips) if spec.format == "rvs" and (data / spec.clips).exists() else None
    questions = []
    for i, raw in enumerate(_read_json_list(path)):
        rec = _Record(path, i, raw)
        qid = rec.ident("id")
        rec.label = f"record {i} (id {qid!r})"
        video = rec.ident("video_id")
        time = rec.time()
        if originals:
            if video not in clips:
                raise rec.fail("video_id", "a clip listed in the clip file")
            video, time = _Record(data / spec.clips, i, clips[video]).ident("original_video"), rec.seconds("end_time")
        elif spec.format == "rvs" and time is None:
            time = _rvs_time(rec, clips, video)
        meta = _meta(rec, ("duration", "start_time", "end_time", "video_name"))
        if "duration" in meta and not isinstance(meta["duration"], (int, float, str)):
            raise rec.fail("duration", "a number or a string")
        questions.append(Question(
            id=qid, video=video, question=rec.text("question"), answer=rec.text("answer", allow_number=True),
            kind="open", qtype=rec.optional_text("answer_type"), time=time, meta=meta,
        ))
    return questions


def _read_clips(path: Path) -> dict[str, dict]:
    clips: dict[str, dict] = {}
    for i, raw in enumerate(_read_json_list(path)):
        rec = _Record(path, i, raw)
        vid = rec.ident("video_id")
        if vid in clips:
            raise DatasetError(f"{path}: duplicate clip video_id {vid!r}")
        clips[vid] = raw
    return clips


def _rvs_time(rec: _Record, clips: dict[str, dict] | None, video: str) -> float | None:
    """The question's time in its clip: `end_time` minus the clip's start (both in the original video's seconds).
    MovieNet clips count keyframe shots (`shot_N`), not seconds, and clips without a clip list end at the question:
    both are asked at the clip's end (None)."""
    end = rec.raw.get("end_time")
    if end is None or clips is None or isinstance(end, str):
        if isinstance(end, str) and not re.fullmatch(r"shot_\d+|\d+(\.\d+)?", end):
            raise rec.fail("end_time", "seconds or 'shot_N'")
        return None
    end = rec.seconds("end_time")
    if video not in clips:
        raise rec.fail("video_id", "a clip listed in the clip file")
    start = clips[video].get("start_time")
    if isinstance(start, bool) or not isinstance(start, (int, float)):
        raise DatasetError(f"clip {video!r}: field 'start_time': expected seconds, got {start!r}")
    if end < start:
        raise rec.fail("end_time", f"a time >= its clip's start_time {start}")
    return end - start


# ---------------------------------------------------------------- multiple choice


def _choice(rec: _Record, qid: str, video: str, question: str, options_key: str, answer, qtype, meta) -> Question:
    options = rec.raw.get(options_key)
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        raise rec.fail(options_key, f"a list of 2 to {len(LETTERS)} options")
    texts = []
    for k, opt in enumerate(options):
        if not isinstance(opt, (str, int, float)) or str(opt).strip() == "":
            raise DatasetError(f"{rec.path}: {rec.label}, option {k}: expected non-empty text, got {opt!r}")
        texts.append(re.sub(rf"^\(?[{LETTERS[:len(options)]}][.):]\s*", "", str(opt).strip()))
    letter = _answer_letter(rec, answer, texts)
    return Question(id=qid, video=video, question=question, answer=letter, kind="choice", qtype=qtype,
                    time=rec.time(), options=tuple(texts), meta=meta)


def _answer_letter(rec: _Record, answer, options: list[str]) -> str:
    n = len(options)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
        return LETTERS[answer]
    if isinstance(answer, str):
        a = answer.strip()
        m = re.fullmatch(rf"\(?([{LETTERS[:n]}])\)?[.):]?", a)
        if m:
            return m.group(1)
        matches = [k for k, text in enumerate(options) if text == a]
        if len(matches) == 1:
            return LETTERS[matches[0]]
        if a.isdigit() and int(a) < n:
            return LETTERS[int(a)]
    raise rec.fail("answer", f"a letter A-{LETTERS[n - 1]}, an index 0-{n - 1} or the text of one option")


def _read_egoschema(path: Path, data: Path, spec: BenchmarkSpec) -> list[Question]:
    answers_file = data / "subset_answers.json"
    answers = json.loads(answers_file.read_text()) if answers_file.exists() else {}
    out = []
    for i, raw in enumerate(_read_json_list(path)):
        rec = _Record(path, i, raw)
        qid = rec.ident("q_uid", "id")
        rec.label = f"record {i} (id {qid!r})"
        if "options" not in rec.raw:
            numbered = [rec.raw[f"option {k}"] for k in range(len(LETTERS)) if f"option {k}" in rec.raw]
            rec.raw = dict(rec.raw, options=numbered)
        answer = rec.raw["answer"] if "answer" in rec.raw else answers.get(qid)
        if answer is None:
            raise rec.fail("answer", f"an answer in the record or in {answers_file.name}")
        video = rec.ident("video_id", "q_uid")
        out.append(_choice(rec, qid, video, rec.text("question"), "options", answer, None, {}))
    return out


def _read_mvbench(path: Path, data: Path, spec: BenchmarkSpec) -> list[Question]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"{path} holds no per-task .json files: expected MVBench's json/<task>.json")
    out = []
    for file in files:
        for i, raw in enumerate(_read_json_list(file)):
            rec = _Record(file, i, raw)
            if rec.raw.get("start") is not None and rec.raw.get("start") != 0:
                raise rec.fail("start", "no segment start (segments that do not begin at 0 s are not supported)")
            if "end" in rec.raw and rec.raw["end"] is not None and "time" not in rec.raw:
                rec.raw = dict(rec.raw, time=rec.raw["end"])
            qid = rec.ident("id") if "id" in rec.raw else f"{file.stem}/{i}"
            rec.label = f"record {i} (id {qid!r})"
            qtype = rec.optional_text("task_type") or file.stem
            out.append(_choice(rec, qid, rec.text("video"), rec.text("question"), "candidates",
                               rec.raw.get("answer"), qtype, {}))
    return out


def _read_videomme(path: Path, data: Path, spec: BenchmarkSpec) -> list[Question]:
    out = []
    for i, raw in enumerate(_read_json_list(path)):
        rec = _Record(path, i, raw)
        qid = rec.ident("question_id", "id")
        rec.label = f"record {i} (id {qid!r})"
        meta = _meta(rec, ("duration", "domain", "sub_category", "video_id"))
        out.append(_choice(rec, qid, rec.ident("videoID", "video_id"), rec.text("question"), "options",
                           rec.raw.get("answer"), rec.optional_text("task_type"), meta))
    return out
