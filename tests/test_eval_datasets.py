"""Benchmark loaders: each published format, question times, and loud failures on bad records and missing files."""

import json

import pytest

from vstream.eval.datasets import DatasetError, load_benchmark


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def touch_videos(root, *names):
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / "videos" / name).write_bytes(b"")  # the loader checks existence only; nothing is decoded


def oe(i, video="v1", **kw):
    return {"video_id": video, "question": f"What is {i}?", "id": i, "answer": "a cup", **kw}


@pytest.mark.parametrize("name,qa", [("vs-ego", "test_qa_ego4d.json"), ("vs-movie", "test_qa_movienet.json"),
                                     ("actnet", "test_qa.json"), ("msvd", "test_qa.json"),
                                     ("msrvtt", "test_qa.json"), ("nextoe", "test_qa.json")])
def test_open_ended_formats(tmp_path, name, qa):
    write(tmp_path / qa, [oe(1, answer_type="CW", duration=30), oe("x2", video="v2.mkv", answer=3, time=4.5)])
    touch_videos(tmp_path, "v1.mp4", "v2.mkv")
    bench = load_benchmark(name, tmp_path)
    first, second = bench.questions
    assert ((first.id, first.video, first.answer, first.qtype, first.time, first.kind)
            == ("1", "v1", "a cup", "CW", None, "open"))
    assert first.meta == {"duration": 30}
    assert (second.answer, second.time) == ("3", 4.5)
    assert bench.video_path("v1").name == "v1.mp4" and bench.video_path("v2.mkv").name == "v2.mkv"
    assert bench.kind == "open"


def test_rvs_question_times_come_from_end_time_and_the_clip_list(tmp_path):
    write(tmp_path / "rvs_ego.json", [{"video_id": "000001", "original_video": "abc", "start_time": 100,
                                       "end_time": 160}])
    write(tmp_path / "test_qa_ego4d.json", [oe("a", video="000001", start_time=110, end_time=130),
                                            oe("b", video="000001", end_time=160),
                                            oe("c", video="000001", timestamp=12)])
    touch_videos(tmp_path, "000001.mp4")
    assert [q.time for q in load_benchmark("rvs-ego", tmp_path).questions] == [30.0, 60.0, 12.0]


def test_rvs_questions_on_the_original_videos(tmp_path):
    write(tmp_path / "rvs_ego.json", [{"video_id": "c1", "original_video": "long", "start_time": 0, "end_time": 60},
                                      {"video_id": "c2", "original_video": "long", "start_time": 0, "end_time": 90}])
    write(tmp_path / "test_qa_ego4d.json", [oe("a", video="c1", end_time=60), oe("b", video="c2", end_time=85)])
    touch_videos(tmp_path, "long.mp4")
    bench = load_benchmark("rvs-ego", tmp_path, originals=True)
    assert [(q.video, q.time) for q in bench.questions] == [("long", 60.0), ("long", 85.0)]
    with pytest.raises(DatasetError, match="originals needs an RVS benchmark"):
        load_benchmark("vs-ego", tmp_path, originals=True)


def test_rvs_movie_shots_and_missing_clip_lists_ask_at_the_clip_end(tmp_path):
    write(tmp_path / "test_qa_movienet.json", [oe("a", video="m1", start_time="shot_0003", end_time="shot_0042")])
    touch_videos(tmp_path, "m1.mp4")
    assert load_benchmark("rvs-movie", tmp_path).questions[0].time is None
    write(tmp_path / "test_qa_movienet.json", [oe("a", video="m1", end_time="soon")])
    with pytest.raises(DatasetError, match=r"record 0 \(id 'a'\), field 'end_time': expected seconds or 'shot_N'"):
        load_benchmark("rvs-movie", tmp_path)


def test_egoschema_with_a_separate_answers_file(tmp_path):
    rec = {"q_uid": "u1", "question": "What did c do?", **{f"option {k}": f"thing {k}" for k in range(5)}}
    write(tmp_path / "questions.json", [rec])
    write(tmp_path / "subset_answers.json", {"u1": 3})
    touch_videos(tmp_path, "u1.mp4")
    q = load_benchmark("egoschema", tmp_path).questions[0]
    assert (q.kind, q.answer, q.options[3], q.video) == ("choice", "D", "thing 3", "u1")
    assert q.prompt().splitlines()[1:3] == ["(A) thing 0", "(B) thing 1"]


def test_mvbench_per_task_files(tmp_path):
    write(tmp_path / "json" / "action_sequence.json", [
        {"video": "clip_a.mp4", "question": "What happened first?", "candidates": ["sat", "stood", "ran"],
         "answer": "stood"},
        {"video": "clip_b.webm", "question": "Then?", "candidates": ["x", "y"], "answer": "x", "end": 4.0},
    ])
    touch_videos(tmp_path, "clip_a.mp4", "clip_b.webm")
    a, b = load_benchmark("mvbench", tmp_path).questions
    assert (a.id, a.answer, a.qtype, b.time) == ("action_sequence/0", "B", "action_sequence", 4.0)


def test_videomme_options_lose_their_letters(tmp_path):
    write(tmp_path / "test_qa.json", [{"video_id": "001", "videoID": "fFjv93ACGo8", "question_id": "001-1",
                                       "duration": "short", "domain": "Knowledge", "task_type": "Counting Problem",
                                       "question": "How many?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
                                       "answer": "C"}])
    touch_videos(tmp_path, "fFjv93ACGo8.mp4")
    q = load_benchmark("videomme", tmp_path).questions[0]
    assert (q.options, q.answer, q.video, q.meta["duration"]) == (("1.", "2.", "3.", "4."), "C", "fFjv93ACGo8", "short")


@pytest.mark.parametrize("record,message", [
    (oe(1, question=""), r"record 0 \(id '1'\), field 'question': expected a non-empty string"),
    ({"video_id": "v1", "question": "q", "answer": "a"},
     r"record 0, field 'id': expected a non-empty string or integer"),
    (oe(1, answer=None), r"field 'answer': expected a non-empty string or a number, got None"),
    (oe(1, time=-2), r"field 'time': expected a number of seconds >= 0, got -2"),
    (oe(1, time=1, timestamp=2), r"one of 'time' and 'timestamp'"),
    (oe(1, video=["v1"]), r"field 'video_id': expected a non-empty string or integer id"),
    ("not a record", r"record 0: expected a JSON object, got str"),
])
def test_bad_records_fail_naming_record_and_field(tmp_path, record, message):
    write(tmp_path / "test_qa.json", [record])
    touch_videos(tmp_path, "v1.mp4")
    with pytest.raises(DatasetError, match=message):
        load_benchmark("actnet", tmp_path)


def test_duplicate_ids_missing_videos_and_features_fail(tmp_path):
    touch_videos(tmp_path, "v1.mp4")
    write(tmp_path / "test_qa.json", [oe(1), oe(1)])
    with pytest.raises(DatasetError, match="duplicate id '1'"):
        load_benchmark("msvd", tmp_path)
    write(tmp_path / "test_qa.json", [oe(1), oe(2, video="gone")])
    with pytest.raises(DatasetError, match=r"record '2', field video: no video file for 'gone'"):
        load_benchmark("msvd", tmp_path)
    (tmp_path / "feats").mkdir()
    (tmp_path / "feats" / "v1.safetensors").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"record '2', field video: feature file .*gone.safetensors does not exist"):
        load_benchmark("msvd", tmp_path, features=tmp_path / "feats")


def test_bad_choice_answers_and_files(tmp_path):
    touch_videos(tmp_path, "a.mp4")
    write(tmp_path / "test_qa.json", [{"videoID": "a", "question_id": "1", "question": "q", "options": ["x", "y"],
                                       "answer": "E"}])
    with pytest.raises(DatasetError, match=r"field 'answer': expected a letter A-B"):
        load_benchmark("videomme", tmp_path)
    write(tmp_path / "test_qa.json", [{"videoID": "a", "question_id": "1", "question": "q", "options": ["x"],
                                       "answer": "A"}])
    with pytest.raises(DatasetError, match=r"field 'options': expected a list of 2 to 10 options"):
        load_benchmark("videomme", tmp_path)
    (tmp_path / "test_qa.json").write_text("{broken")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        load_benchmark("videomme", tmp_path)
    with pytest.raises(DatasetError, match="unknown benchmark 'nope'"):
        load_benchmark("nope", tmp_path)
    with pytest.raises(DatasetError, match=r"holds none of \['test_qa.json'\]"):
        load_benchmark("msrvtt", tmp_path / "videos")
