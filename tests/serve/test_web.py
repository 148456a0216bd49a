"""The web chat page (serve/web/) in a real browser: Debian's chromium, driven by Playwright, against the
real Serve application on a private Ray instance.

Two applications in one Serve instance: `web` at `/` serves the shipped demo model on CPU with an API key
and small limits (so the oversized cases are cheap), and `slow` at `/slow` runs `fakes:SlowEngine`, whose
answers trickle in a word at a time, with room for one request and one queued: an answer that is still
running when the test presses Stop, and a server that is really at capacity (503) for the busy message.

Screenshots of the finished conversation (desktop and phone width), of the error, key and busy states go
to tests/artifacts/ (git-ignored). Without chromium the module is skipped, except in CI, where it fails.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright import sync_api as playwright_api

from conftest import bomb_png
from raylens.demo.shapes import format_caption

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "images" / "red_triangle_on_yellow.png"
ARTIFACTS = REPO / "tests" / "artifacts"
KEY = "web-test-key"
MODEL = "raylens-demo"
MAX_PIXELS = 300_000
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# This machine's network is closed: nothing in the browser may try to reach out.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

WEB_ARGS = dict(
    engine="transformers", api_key=KEY, default_max_tokens=48, max_tokens_limit=64, max_images=4,
    max_image_pixels=MAX_PIXELS, max_image_bytes=400_000, max_body_bytes=3_000_000, stream_interval_ms=0,
    min_replicas=1, max_replicas=1, max_ongoing_requests=4, max_queued_requests=8, max_batch_size=2,
    num_cpus=0, ingress_num_cpus=0, ingress_max_replicas=1,
)
SLOW_ARGS = dict(
    engine="fakes:SlowEngine", engine_args={"word_delay_s": 0.25}, min_replicas=1, max_replicas=1,
    max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2, num_cpus=0, ingress_num_cpus=0, ingress_max_replicas=1,
)

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium before the tests")
    pytest.skip("needs Debian's chromium (apt-get install chromium; .ci/run installs it)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    from serve.app import bind
    from serve.config import ServeConfig

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(bind(ServeConfig(**WEB_ARGS).with_engine_resolved(0)), name="web", route_prefix="/")
        serve.run(bind(ServeConfig(**SLOW_ARGS).with_engine_resolved(0)), name="slow", route_prefix="/slow")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1040, "height": 700})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def job_caption(image: Path) -> str:
    """What the batch job writes for an example image: the demo model captions each one exactly as it is
    named (tests/jobs/test_caption.py checks that of the README's job command, and
    tests/serve/test_endpoint.py that the endpoint answers the job's text), so the page's answer is
    compared with the name rather than by running the job once more."""
    color, shape, _, background = image.stem.split("_")
    return format_caption(color, shape, background)


# ------------------------------------------------------------------------------------ helpers
def enter_key(page) -> None:
    page.fill("#api-key", KEY)
    page.click("#save-key")
    page.wait_for_function(f"() => document.getElementById('model-name').textContent === {MODEL!r}")
    assert page.is_hidden("#settings")


def ask(page, text: str | None = None) -> dict:
    """Types `text` (None: leaves the box empty), presses Enter, waits for the answer to finish or fail;
    returns the JSON body the page sent."""
    answers = page.locator(".msg.assistant").count()
    if text is not None:
        page.fill("#prompt", text)
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    page.wait_for_function(f"""() => {{
        const all = document.querySelectorAll('.msg.assistant');
        return all.length > {answers} && !all[all.length - 1].classList.contains('streaming');
    }}""")
    return json.loads(request.value.post_data)


def last_answer(page):
    return page.locator(".msg.assistant").last


def png_file(path: Path, size: tuple[int, int], color=(30, 120, 200)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def data_url_image(url: str) -> Image.Image:
    assert url.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def image_urls(message: dict) -> list[str]:
    return [part["image_url"]["url"] for part in message["content"] if part["type"] == "image_url"]


# -------------------------------------------------------------------------------------- tests
def test_page_and_its_files_are_served_beside_the_api(server):
    page = httpx.get(server + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="web/app.js">' in page.text
    for name, kind in [("app.js", "javascript"), ("api.js", "javascript"), ("images.js", "javascript"),
                       ("style.css", "text/css"), ("icon.svg", "image/svg+xml")]:
        response = httpx.get(f"{server}/web/{name}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    # the page takes / and /web/ only: the API's own routing answers everything else
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server + "/v1/chat/completions", headers=headers, timeout=10).status_code == 405
    missing = httpx.get(server + "/web/nothing.js", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    card = httpx.get(server + "/v1/models", headers=headers, timeout=30).json()["data"][0]
    assert card["raylens"]["max_image_pixels"] == MAX_PIXELS and card["raylens"]["max_images"] == 4
    assert httpx.get(server + "/slow/", timeout=10).status_code == 200  # under a route prefix too


def test_a_conversation_in_the_browser(server, page, tmp_path):
    page.goto(server + "/")
    # the server wants a key: the page says so and asks for it
    page.wait_for_selector("#key-notice:not([hidden])")
    assert "needs an API key" in page.inner_text("#key-notice")
    assert page.is_visible("#api-key")
    enter_key(page)
    assert "images over 0.3 MP are downscaled" in page.inner_text("#limits")

    # an example image, an empty question (the caption prompt): the streamed answer is the batch job's caption
    page.set_input_files("#file-input", str(EXAMPLE))
    page.wait_for_selector(".chip img")
    assert page.inner_text(".chip-info") == "557×418"
    body = ask(page)
    assert body["stream"] is True and body["model"] == MODEL and body["temperature"] == 0
    [message] = body["messages"]
    assert image_urls(message) == ["data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()]
    assert message["content"][-1] == {"type": "text", "text": "Provide a one-sentence caption for the provided image."}
    answer = last_answer(page)
    caption = job_caption(EXAMPLE)
    assert answer.locator(".text").inner_text() == caption
    meta = answer.locator(".meta").inner_text()
    assert meta.startswith(f"{MODEL} · ") and " tokens · " in meta and meta.endswith(" s")
    assert page.locator(".msg.user .images img").count() == 1

    # a follow-up: the whole conversation goes again, the image kept in its first turn
    body = ask(page, "What colour is the background?")
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == caption
    assert image_urls(body["messages"][0]) == [image_urls(message)[0]]
    assert last_answer(page).locator(".text").inner_text().strip()
    assert not page.locator(".error-card").count()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat-desktop.png"))
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out at phone width
    box = page.locator("#prompt").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844
    page.screenshot(path=str(ARTIFACTS / "web-chat-phone.png"))
    page.set_viewport_size({"width": 1040, "height": 700})

    # an image over the server's pixel cap is downscaled in the browser and answered
    big = png_file(tmp_path / "big.png", (900, 600))
    page.set_input_files("#file-input", str(big))
    page.wait_for_selector(".chip.downscaled")
    body = ask(page, "And this one?")
    sent = data_url_image(image_urls(body["messages"][-1])[0])
    assert sent.width * sent.height <= MAX_PIXELS and sent.width * sent.height > 0.95 * MAX_PIXELS
    assert abs(sent.width / sent.height - 1.5) < 0.01
    assert not last_answer(page).locator(".error-card").count()

    # an image the server refuses as too large (a decompression bomb): a readable 413, nothing lost
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    page.set_input_files("#file-input", str(tmp_path / "bomb.png"))
    page.wait_for_selector(".chip .file-box")
    ask(page, "What is this?")
    card = last_answer(page).locator(".error-card")
    assert card.locator("strong").inner_text() == "Too large"
    assert "too large" in card.locator(".detail").inner_text() and "pixels" in card.locator(".detail").inner_text()
    assert "0.3 MP" in card.locator(".hint").inner_text()
    assert "dropped" in page.locator(".msg.user").last.get_attribute("class")
    assert page.input_value("#prompt") == "What is this?" and page.locator(".chip").count() == 1  # back to fix and resend
    page.screenshot(path=str(ARTIFACTS / "web-chat-error.png"))
    page.click(".chip-remove")
    assert page.is_hidden("#tray")

    # the refused turn is not part of the conversation: the next question carries the 3 answered turns
    page.click("#settings-toggle")
    page.fill("#max-tokens", "8")
    page.click("#settings-toggle")
    body = ask(page, "Thanks.")
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"] * 3 + ["user"] and body["max_tokens"] == 8


def test_errors_are_readable(server, page):
    page.goto(server + "/")
    page.wait_for_selector("#key-notice:not([hidden])")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat-key.png"))
    page.click("#settings-toggle")  # close the settings without a key: asking anyway gets the 401 explained
    ask(page, "hello")
    card = last_answer(page).locator(".error-card")
    assert card.locator("strong").inner_text() == "API key needed"
    assert "API key" in card.locator(".detail").inner_text()
    assert page.is_visible("#api-key")  # and the key field is offered again
    enter_key(page)

    page.click("#settings-toggle")
    page.fill("#max-tokens", "1000")  # above the server's max_tokens_limit of 64: the server's 400, in words
    page.click("#settings-toggle")
    ask(page)  # the "hello" that failed is still in the box
    card = last_answer(page).locator(".error-card")
    assert card.locator("strong").inner_text() == "The server could not use this request"
    assert "max_tokens" in card.locator(".detail").inner_text()


def _hold(url: str, words: int, stop: threading.Event, refused: dict, key: int) -> None:
    """A streamed request that keeps the slow app busy until it has answered `words` words or `stop` is set;
    refused with 503 (something else held its place for a moment), it records when in `refused[key]` and asks
    again."""
    body = {"messages": [{"role": "user", "content": " ".join(["busy"] * words)}], "stream": True}
    for _ in range(400):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            if response.status_code == 503:
                refused[key] = time.monotonic()
                time.sleep(0.05)
                continue
            for _ in response.iter_lines():
                if stop.is_set():
                    return
            return


def _fill_to_capacity(url: str, stop: threading.Event) -> list[threading.Thread]:
    """Two long answers on the slow app: one running, one queued, its whole capacity. They are known to be in
    place when a probe is refused with 503 and neither holder has been refused for a second: then the two places
    are theirs, not a probe's that was let in (it waits in the queue until its timeout drops it) nor an earlier
    stream's that is still being cancelled (either would free its place again, for the page's request to take)."""
    refused = {0: time.monotonic(), 1: time.monotonic()}
    holders = [threading.Thread(target=_hold, args=(url, 120, stop, refused, k), daemon=True) for k in range(2)]
    for holder in holders:
        holder.start()
    probe = {"messages": [{"role": "user", "content": "probe"}], "max_tokens": 1}
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            response = httpx.post(url + "/v1/chat/completions", json=probe, timeout=3)
            seen.append(response.status_code)
            if response.status_code == 503 and time.monotonic() - max(refused.values()) >= 1.0:
                return holders
        except httpx.TimeoutException:
            seen.append("timeout")
        time.sleep(0.2)
    raise AssertionError(f"the slow app never reached its capacity: probes got {seen}")


def test_stop_new_chat_and_busy_server(server, page):
    slow = server + "/slow"
    page.goto(slow + "/")  # the page finds its API under the route prefix
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'raylens-demo'")
    words = " ".join(str(i) for i in range(1, 61))  # 15 s of answer, a word every 0.25 s
    page.fill("#prompt", words)
    page.press("#prompt", "Enter")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .text') || {}).textContent?.startsWith('1 2 3')")
    assert page.is_visible("#stop") and page.is_hidden("#send")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.stopped")
    partial = last_answer(page).locator(".text").inner_text()
    assert words.startswith(partial) and partial.startswith("1 2 3") and len(partial) < len(words)
    assert last_answer(page).locator(".meta").inner_text().startswith("stopped after")
    assert page.is_visible("#send")

    # the stopped answer stays in the conversation as far as it went
    body = ask(page, "go on")
    assert [m["content"] for m in body["messages"][1:]] == [partial, [{"type": "text", "text": "go on"}]]
    assert last_answer(page).locator(".text").inner_text() == "go on"

    # New chat in the middle of an answer: the answer stops and nothing of the old conversation is kept
    page.fill("#prompt", words)
    page.press("#prompt", "Enter")
    page.wait_for_function("""() => { const a = document.querySelectorAll('.msg.assistant');
                                      return a.length === 3 && a[2].querySelector('.text').textContent.startsWith('1 2'); }""")
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.is_visible("#empty") and page.is_visible("#send")
    body = ask(page, "fresh start")
    assert len(body["messages"]) == 1

    # a server at capacity (one running, one queued): 503 as "busy", with when to retry
    stop = threading.Event()
    holders = _fill_to_capacity(slow, stop)
    try:
        ask(page, "are you there")
    finally:
        stop.set()
    card = last_answer(page).locator(".error-card")
    assert card.locator("strong").inner_text() == "The model is busy"
    assert "Try again in 2 s" in card.locator(".hint").inner_text()
    page.screenshot(path=str(ARTIFACTS / "web-chat-busy.png"))
    for holder in holders:
        holder.join(30)


def test_paste_and_drop_attach_images(server, page):
    page.goto(server + "/")
    page.wait_for_selector("#key-notice:not([hidden])")
    enter_key(page)
    png = base64.b64encode(EXAMPLE.read_bytes()).decode()
    make_files = f"""(names) => {{
        const bytes = Uint8Array.from(atob({png!r}), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        for (const n of names) dt.items.add(n.endsWith('.png') ? new File([bytes], n, {{type: 'image/png'}})
                                                              : new File(['plain text'], n, {{type: 'text/plain'}}));
        return dt;
    }}"""
    page.evaluate(f"document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: ({make_files})(['a.png'])}}))")
    page.wait_for_function("() => document.querySelectorAll('.chip img').length === 1")
    page.evaluate(f"window.dispatchEvent(new DragEvent('drop', {{dataTransfer: ({make_files})(['b.png', 'notes.txt'])}}))")
    page.wait_for_function("() => document.querySelectorAll('.chip img').length === 2")
    assert "Only images can be attached" in page.inner_text("#notice")
    page.evaluate(f"window.dispatchEvent(new DragEvent('drop', {{dataTransfer: ({make_files})(['c.png', 'd.png', 'e.png'])}}))")
    page.wait_for_function("() => document.querySelectorAll('.chip img').length === 4")  # max_images is 4
    assert "at most 4 images per conversation" in page.inner_text("#notice")
    # Shift+Enter breaks the line instead of sending
    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "second line")
    assert page.input_value("#prompt") == "first line\nsecond line" and page.locator(".msg").count() == 0


def test_sse_parser_takes_any_chunking(server, page):
    page.goto(server + "/slow/")
    events = 'data: {"a":1}\n\ndata: {"b":"x\\ny"}\r\n\r\n: comment\n\ndata: [DONE]\n\n'
    result = page.evaluate("""async (text) => {
        const { SseParser } = await import('./web/api.js');
        const out = [];
        for (let cut = 0; cut <= text.length; cut++) {
            const parser = new SseParser();
            out.push([...parser.push(text.slice(0, cut)), ...parser.push(text.slice(cut))]);
        }
        return out;
    }""", events)
    assert all(payloads == ['{"a":1}', '{"b":"x\\ny"}', "[DONE]"] for payloads in result), result
