"""The web page in a real headless Chromium (PyPI playwright driving Debian's /usr/bin/chromium, fake webcam): unlock
with the key, start the webcam, see frames acknowledged and ingested, ask a question, see the streamed answer with its
times, open a frame, see the memory panel fill; then upload a generated video file. No console errors allowed, so
nothing the page does is blocked by its Content-Security-Policy. Page predicates are functions, not expression
strings: Playwright evaluates a string with eval, which the page's CSP forbids."""

from __future__ import annotations

from pathlib import Path

import av
import pytest
from playwright.sync_api import expect, sync_playwright

import vstream
from helpers import KEY, running_server
from vstream.server import create_app
from vstream.synth.clips import moving_shapes

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def base():
    app = create_app(vstream.load("tiny"), api_key=KEY)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (CI does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, base):
    context = browser.new_context(base_url=base, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto("/")
    yield page
    context.close()
    assert problems == []


def unlock(page) -> None:
    expect(page.locator("#unlock")).to_be_visible()
    page.fill("#key", KEY)  # typed by the person: the page's code holds no key
    page.click("#unlock button")
    expect(page.locator("#unlock")).to_be_hidden()
    assert page.input_value("#key") == ""


def ask(page, question: str) -> None:
    page.fill("#question", question)
    page.click("#send")
    answer = page.locator("#log li.a").last
    expect(answer).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    assert answer.locator(".text").inner_text().strip()
    expect(answer.locator(".time").first).to_be_visible()


def test_webcam_question_and_memory_panel(page, tmp_path):
    unlock(page)
    page.click("#webcam")
    expect(page.locator("#s-id")).to_contain_text("str_", timeout=WAIT_MS)
    page.wait_for_function("() => Number(document.getElementById('s-ingested').textContent) >= 3", timeout=WAIT_MS)
    assert page.evaluate("() => document.getElementById('preview').videoWidth") == 640
    ask(page, "What is on the screen?")
    page.locator("#log li.a .time").first.click()
    viewer = page.locator("#viewer-img")
    expect(viewer).to_be_visible()
    page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0", timeout=WAIT_MS)
    expect(page.locator("#timeline rect.cluster").first).to_be_attached(timeout=WAIT_MS)
    expect(page.locator("#spatial img")).to_have_count(1, timeout=WAIT_MS)
    page.wait_for_function("() => [...document.querySelectorAll('#retrieved img, #spatial img')]"
                           ".every((i) => i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
    assert "tokens" in page.inner_text("#m-summary")
    page.screenshot(path=str(tmp_path / "webcam.png"), full_page=True)
    assert (tmp_path / "webcam.png").stat().st_size > 10_000
    page.click("#stop")


def _webm(path: Path, seconds: int = 5, fps: int = 10) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for frame in moving_shapes(seconds * fps, 320, 240, seed=3, fps=fps):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


def test_uploaded_video_file(page, tmp_path):
    unlock(page)
    page.set_input_files("#file", str(_webm(tmp_path / "clip.webm")))
    expect(page.locator("#notice")).to_contain_text("whole file was sent", timeout=WAIT_MS)
    assert int(page.inner_text("#s-received")) == 5 and int(page.inner_text("#s-dropped")) == 0
    page.wait_for_function("() => Number(document.getElementById('s-ingested').textContent) >= 4 || "
                           "document.querySelectorAll('#retrieved img').length > 0", timeout=WAIT_MS)
    ask(page, "What moved?")
    expect(page.locator("#timeline circle.spatial").first).to_be_attached(timeout=WAIT_MS)
    page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)


def test_a_watch_added_on_the_page_is_listed_marked_on_the_timeline_and_deleted(page, tmp_path):
    """The page's watch form on an uploaded file's stream: the watch is listed, its trigger (threshold -1e9: the tiny
    random model fires at the first evaluation) arrives on the socket and is marked on the memory timeline, a click on
    the mark shows its frame, and Delete removes the watch."""
    unlock(page)
    page.set_input_files("#file", str(_webm(tmp_path / "clip.webm")))
    expect(page.locator("#notice")).to_contain_text("whole file was sent", timeout=WAIT_MS)
    page.fill("#watch-condition", "a red circle appears")
    page.fill("#watch-threshold", "-1000000000")
    page.click("#watch-add")
    item = page.locator("#watches li")
    expect(item).to_have_count(1, timeout=WAIT_MS)
    expect(item.locator(".condition")).to_have_text("a red circle appears")
    mark = page.locator("#timeline rect.trigger")
    expect(mark).to_have_count(1, timeout=WAIT_MS)
    watch_id = item.get_attribute("data-watch")
    assert watch_id.startswith("wat_") and mark.get_attribute("data-watch") == watch_id
    expect(item).to_have_class("active", timeout=WAIT_MS)
    expect(item).to_contain_text("1 events", timeout=WAIT_MS)
    mark.click()
    expect(page.locator("#viewer-caption")).to_contain_text("triggering frame")
    page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0", timeout=WAIT_MS)
    page.screenshot(path=str(tmp_path / "watch.png"), full_page=True)
    item.locator(".watch-delete").click()
    expect(page.locator("#watches li")).to_have_count(0, timeout=WAIT_MS)
