"""Feature extraction: the released layout, file names, resumability, and the same memory as encoding the video."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vstream.cli import app
from vstream.eval.features import extract_features, feature_name, load_features
from vstream.synth.clips import write_test_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_test_video(root / "a.mp4", seconds=6, fps=5, size=(96, 64), seed=1)
    (root / "sub").mkdir()
    write_test_video(root / "sub" / "mp4.clip.mkv", seconds=3, fps=5, size=(96, 64), seed=2)
    (root / "notes.txt").write_text("not a video")
    return root


def test_feature_names_replace_only_the_video_extension():
    assert feature_name("a.mp4") == "a.safetensors"
    assert feature_name("mp4/x.mp4.mp4") == "mp4/x.mp4.safetensors"
    assert feature_name("v_abc") == "v_abc.safetensors"
    assert feature_name("clip.0.5") == "clip.0.5.safetensors"


def test_extracted_features_have_the_released_layout_and_give_the_same_memory(model, videos, tmp_path):
    done = extract_features(model, videos, tmp_path, frames_per_call=4)
    assert done == {"written": ["a.mp4", "sub/mp4.clip.mkv"], "skipped": []}
    raw = load_file(str(tmp_path / "a.safetensors"))
    assert list(raw) == ["feature"]
    assert raw["feature"].shape == (6, 256, 32)  # 6 s at 1 fps, [T, grid^2, D] of the tiny model
    assert (tmp_path / "sub" / "mp4.clip.safetensors").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.safetensors", "mp4.clip.safetensors", "sub"]

    features, times = load_features(tmp_path / "a.safetensors")
    assert times == pytest.approx([0, 1, 2, 3, 4, 5])
    direct = next(model.memory_snapshots(str(videos / "a.mp4"), [None], frames_per_call=4))
    loaded = model.memory_from_features(features, times)
    assert torch.equal(direct.tokens, loaded.tokens)
    assert torch.equal(direct.retrieved_times, loaded.retrieved_times)
    assert loaded.frames_seen == 6


def test_extraction_resumes_without_recomputing(model, videos, tmp_path):
    extract_features(model, videos, tmp_path, frames_per_call=4)
    first = tmp_path / "a.safetensors"
    stamp = first.stat().st_mtime_ns
    (tmp_path / "sub" / "mp4.clip.safetensors").unlink()
    done = extract_features(model, videos, tmp_path, frames_per_call=8)
    assert done == {"written": ["sub/mp4.clip.mkv"], "skipped": ["a.mp4"]}
    assert first.stat().st_mtime_ns == stamp


def test_a_broken_video_stops_extraction_and_leaves_no_partial_file(model, videos, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    os.link(videos / "a.mp4", bad / "a.mp4")
    (bad / "b.mp4").write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="b.mp4"):
        extract_features(model, bad, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors"]


def test_released_files_without_times_read_as_one_fps(tmp_path):
    save_file({"feature": torch.zeros(3, 256, 8)}, str(tmp_path / "x.safetensors"))
    features, times = load_features(tmp_path / "x.safetensors")
    assert features.shape == (3, 256, 8) and times == [0.0, 1.0, 2.0]
    save_file({"video": torch.zeros(3, 4)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="'feature'"):
        load_features(tmp_path / "y.safetensors")


@pytest.mark.slow
def test_cli_extract_features(videos, tmp_path):
    result = CliRunner().invoke(app, ["extract-features", str(videos), str(tmp_path), "--frames-per-call", "3"])
    assert result.exit_code == 0, result.output
    assert "2 written, 0 already there" in result.output
    again = CliRunner().invoke(app, ["extract-features", str(videos), str(tmp_path), "--batch-size", "2"])  # old name
    assert "0 written, 2 already there" in again.output
