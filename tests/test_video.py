"""Decoding and timestamp sampling of real files written by PyAV (vstream.video, vstream.synth.clips)."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest

from vstream.synth.clips import (
    BARCODE_COLOUR,
    barcode_frame,
    moving_shapes,
    read_barcode,
    write_test_video,
    write_video,
)
from vstream.video import VideoError, VideoNotFoundError, iter_frames, probe, read_frames


@pytest.fixture(scope="module")
def barcode_mp4(tmp_path_factory):
    """10 s at 10 fps, frame i shows index i: H.264 in mp4."""
    path = tmp_path_factory.mktemp("video") / "barcode.mp4"
    return write_video(path, (barcode_frame(i) for i in range(100)), fps=10)


def indices(frames):
    return [read_barcode(f) for f in frames]


def reference_sampling(times, fps, start=0.0):
    """Index of the frame each sample takes: the first frame at or after the due time, one sample per frame, due times
    passed by a gap skipped. Written as a plain scan over due times."""
    taken, k, j = [], 0, 0
    while True:
        due = start + k / fps
        while j < len(times) and times[j] < due - 1e-9:
            j += 1
        if j == len(times):
            return taken
        taken.append(j)
        while start + k / fps <= times[j] + 1e-9:
            k += 1
        j += 1


@pytest.mark.parametrize("fps", [1.0, 2.0, 0.5, 3.0])
def test_samples_by_timestamp_at_constant_rate(barcode_mp4, fps):
    times, frames = read_frames(barcode_mp4, fps=fps)
    expected = [math.ceil(k * 10 / fps - 1e-9) for k in range(100) if k / fps <= 9.9 + 1e-9]
    assert indices(frames) == expected
    assert times == pytest.approx([i / 10 for i in expected], abs=1e-6)
    assert all(f.shape == (240, 320, 3) and f.dtype == np.uint8 for f in frames)


def test_channel_order_is_rgb(barcode_mp4):
    _, frames = read_frames(barcode_mp4, fps=1, until=0)
    lower = frames[0][150:230].reshape(-1, 3).mean(axis=0)
    assert lower == pytest.approx(BARCODE_COLOUR, abs=4)


def test_until_is_inclusive_and_start_shifts_due_times(barcode_mp4):
    times, frames = read_frames(barcode_mp4, fps=1, until=4.0)
    assert times == pytest.approx([0, 1, 2, 3, 4]) and indices(frames) == [0, 10, 20, 30, 40]
    assert len(read_frames(barcode_mp4, fps=1, until=4.05)[0]) == 5
    samples = list(iter_frames(barcode_mp4, fps=1, start=2.5, until=6))
    assert [read_barcode(f) for _, f in samples] == [25, 35, 45, 55]


def test_stopping_early_closes_cleanly(barcode_mp4):
    it = iter_frames(barcode_mp4, fps=5)
    assert read_barcode(next(it)[1]) == 0
    it.close()


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_variable_frame_rate_hand_checked(tmp_path, suffix):
    stamps = [0.0, 0.1, 0.95, 1.2, 1.3, 3.5, 3.6, 4.0, 6.2]
    path = write_video(tmp_path / f"vfr{suffix}", (barcode_frame(i) for i in range(9)), timestamps=stamps)
    times, frames = read_frames(path, fps=1)
    # due 0 -> 0.0; due 1 -> 1.2; due 2 -> 3.5 (due 3 passed in the gap); due 4 -> 4.0; due 5 -> 6.2 (due 6 passed)
    assert indices(frames) == [0, 3, 5, 7, 8]
    assert times == pytest.approx([0.0, 1.2, 3.5, 4.0, 6.2], abs=1e-6)


def test_variable_frame_rate_matches_reference(tmp_path):
    rng = np.random.default_rng(3)
    stamps = np.round(np.cumsum(rng.uniform(0.05, 0.9, 30)) - 0.05, 3).tolist()
    path = write_video(tmp_path / "vfr30.mkv", (barcode_frame(i, 96, 48) for i in range(30)), timestamps=stamps)
    relative = [t - stamps[0] for t in stamps]  # the first frame is at 0.073 s: times count from the stream start
    for fps in (1.0, 2.5):
        times, frames = read_frames(path, fps=fps)
        assert indices(frames) == reference_sampling(relative, fps)
        assert times == pytest.approx([relative[i] for i in indices(frames)], abs=1e-6)


def test_probe_reads_the_header(barcode_mp4):
    info = probe(barcode_mp4)
    assert (info.width, info.height, info.codec, info.num_video_streams) == (320, 240, "h264", 1)
    assert info.fps == pytest.approx(10) and info.duration == pytest.approx(10, abs=0.11) and info.num_frames == 100


def test_odd_size_gray_and_alpha_sources_come_back_rgb(tmp_path):
    odd_frames = (barcode_frame(i, 161, 97) for i in range(20))
    odd = write_video(tmp_path / "odd.mkv", odd_frames, codec="ffv1", pix_fmt="yuv444p")
    times, frames = read_frames(odd, fps=2)
    assert frames[0].shape == (97, 161, 3) and indices(frames) == [0, 5, 10, 15]

    gray_frames = (barcode_frame(i, 64, 48)[..., 0] for i in range(10))
    gray = write_video(tmp_path / "gray.mkv", gray_frames, codec="ffv1", pix_fmt="gray")
    _, frames = read_frames(gray, fps=5)
    assert indices(frames) == [0, 2, 4, 6, 8]
    assert frames[0].shape == (48, 64, 3) and (frames[0][..., 0] == frames[0][..., 2]).all()

    for name, codec, pix_fmt in (("alpha.mov", "png", "rgba"), ("qtrle.mov", "qtrle", "argb")):
        rgba = (np.dstack([barcode_frame(i, 64, 48), np.full((48, 64), 100, np.uint8)]) for i in range(10))
        _, frames = read_frames(write_video(tmp_path / name, rgba, codec=codec, pix_fmt=pix_fmt), fps=5)
        assert indices(frames) == [0, 2, 4, 6, 8]
        assert frames[0].shape == (48, 64, 3) and tuple(frames[0][40, 30]) == BARCODE_COLOUR  # alpha dropped, lossless


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(VideoNotFoundError, match="nope.mp4 does not exist") as info:
        read_frames(tmp_path / "nope.mp4")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, VideoError)
    with pytest.raises(VideoError, match="is not a file"):
        probe(tmp_path)


def test_text_and_random_bytes_are_not_videos(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).bytes(50_000))
    for path in (text, noise):
        with pytest.raises(VideoError, match=f"{path.name} is not a readable video.*InvalidDataError"):
            read_frames(path)
        with pytest.raises(VideoError, match="not a readable video"):
            probe(path)


def test_truncated_mp4_without_its_index_fails_at_open(barcode_mp4, tmp_path):
    data = barcode_mp4.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.4)])  # the moov index is written last: it is gone
    with pytest.raises(VideoError, match="cut.mp4 is not a readable video"):
        read_frames(cut)


def test_truncated_mkv_yields_the_frames_before_the_damage(tmp_path):
    frames = (_barcode_over_noise(i, seed=i) for i in range(30))
    full = write_video(tmp_path / "full.mkv", frames, codec="ffv1", pix_fmt="yuv420p")
    data = full.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.4)])
    times, got = read_frames(cut, fps=10)
    assert 0 < len(got) < 30
    assert indices(got) == list(range(len(got))) and times == pytest.approx([i / 10 for i in range(len(got))])


def test_corrupt_packets_raise_after_the_good_frames(tmp_path):
    frames = (_barcode_over_noise(i, seed=i) for i in range(30))
    full = write_video(tmp_path / "full.mp4", frames, fps=10, options={"preset": "ultrafast"})
    data = bytearray(full.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 20_000] = np.random.default_rng(0).bytes(20_000)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    got = []
    with pytest.raises(VideoError, match=r"bad.mp4: decoding failed after \d+ good frames") as info:
        for _, frame in iter_frames(bad, fps=10):
            got.append(read_barcode(frame))
    assert f"after {len(got)} good frames" in str(info.value)
    assert 0 < len(got) < 30 and got == list(range(len(got)))


def test_container_without_video_frames_or_stream(tmp_path):
    empty = tmp_path / "empty_video.mkv"
    audio_only = tmp_path / "audio.mka"
    _write_audio(empty, with_video_stream=True)
    _write_audio(audio_only, with_video_stream=False)
    with pytest.raises(VideoError, match="empty_video.mkv contains no decodable video frames"):
        read_frames(empty)
    with pytest.raises(VideoError, match=r"audio.mka has no video stream: expected at least one, found \['audio'\]"):
        read_frames(audio_only)


def test_bad_sampling_arguments(barcode_mp4):
    for kwargs in ({"fps": 0}, {"fps": -1}, {"start": -1}, {"start": 5, "until": 4}):
        with pytest.raises(ValueError):
            next(iter_frames(barcode_mp4, **kwargs))


def test_synthetic_clips_are_deterministic_and_move(tmp_path):
    a = list(moving_shapes(25, 64, 48, seed=1))
    b = list(moving_shapes(25, 64, 48, seed=1))
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[0] == a[1]).all()  # shapes move
    assert (a[0][0, 0] != a[24][0, 0]).any() or (a[0] != a[24]).any()
    path = write_test_video(tmp_path / "demo.mp4", seconds=2, fps=10, size=(64, 48))
    info = probe(path)
    assert (info.width, info.height, info.num_frames) == (64, 48, 20)


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one frame"):
        write_video(tmp_path / "none.mp4", [])
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", [np.zeros((48, 64, 3), np.float32)])
    with pytest.raises(ValueError, match="strictly increasing"):
        write_video(tmp_path / "t.mkv", [barcode_frame(0, 64, 48)] * 2, timestamps=[0.5, 0.5])
    with pytest.raises(ValueError, match="2 frames for 3 timestamps"):
        write_video(tmp_path / "n.mkv", [barcode_frame(0, 64, 48)] * 2, timestamps=[0, 1, 2])


def _barcode_over_noise(index, seed):
    """A barcode on top and noise below: big packets, so byte damage lands inside frame data."""
    frame = barcode_frame(index, 96, 64)
    frame[32:] = np.random.default_rng(seed).integers(0, 256, (32, 96, 3), dtype=np.uint8)
    return frame


def _write_audio(path, with_video_stream):
    """One second of silence; optionally next to a video stream that receives no frames."""
    with av.open(str(path), "w") as container:
        if with_video_stream:
            video = container.add_stream("libx264", rate=10)
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        samples.sample_rate = 8000
        for packet in [*audio.encode(samples), *audio.encode()]:
            container.mux(packet)
        if with_video_stream:
            for packet in video.encode():
                container.mux(packet)
