"""The chat page `dsv4 serve` answers `/` with, in a real browser: headless Chromium (Debian's chromium and
chromedriver, nothing downloaded) driving the page against a live server on loopback with the demo model.

Screenshots of each state go to the test's tmp_path; with DSV4_SCREENSHOT_DIR set, the weather round trip is also
written there as chat-page.png (the README's picture: `DSV4_SCREENSHOT_DIR=docs pytest tests/test_chat_page.py`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dsv4.demo.corpus import WEATHER, calculate, weather_report
from dsv4.runtime import EngineConfig, ModelSource, ServerConfig, build_serve_context
from dsv4.serve.app import create_app
from dsv4.serve.background import serve_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
API_KEY = "page-test-key"
WAIT = 60  # seconds for a reply on 2 shared cores (the demo answers in about one)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def driver():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.exists(p) or shutil.which(Path(p).name))]
    if missing:
        pytest.fail(f"the chat page tests need Chromium and chromedriver ({', '.join(missing)} missing): "
                    "apt-get install chromium chromium-driver (what .ci/run does)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the chat page tests need selenium: pip install 'selenium>=4.20' (the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        options.add_argument(arg)
    # the system driver: Selenium Manager would otherwise try to download one
    service = Service(CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver"))
    browser = webdriver.Chrome(service=service, options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def server():
    """(base URL, ServeContext) of the demo model, no API key."""
    ctx = build_serve_context(ModelSource(model="demo"), EngineConfig(max_batch=2))
    with serve_in_thread(create_app(ctx)) as url:
        yield url, ctx


# ---------------------------------------------------------------- page helpers
def wait(browser, condition, timeout=WAIT, message=""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition, message)


def open_page(browser, url):
    browser.get(url + "/")
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "1",
         message="the page did not load its settings")


def find(browser, css):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, css)


def find_all(browser, css):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, css)


def set_mode(browser, mode):
    from selenium.webdriver.support.ui import Select

    Select(find(browser, "#mode")).select_by_value(mode)


def set_tools(browser, on):
    box = find(browser, "#use-tools")
    if box.is_selected() != on:
        box.click()


def ask(browser, text):
    """Type `text` and press Enter (the keyboard path); the page is busy from the key press on."""
    from selenium.webdriver.common.keys import Keys

    prompt = find(browser, "#prompt")
    prompt.clear()
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)


def wait_idle(browser, timeout=WAIT):
    wait(browser, lambda d: d.execute_script("return document.body.dataset.state") == "idle", timeout,
         "the reply did not finish")


def text_of(element):
    return element.get_attribute("textContent")


def stat(reply, key):
    return text_of(reply.find_element("css selector", f'[data-stat="{key}"] .stat-value'))


def running_requests(url):
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        body = r.read().decode()
    match = re.search(r"^dsv4_running_requests (\S+)$", body, re.M)
    assert match, "no dsv4_running_requests gauge in /metrics"
    return float(match.group(1))


def shoot(browser, tmp_path, name, readme=False):
    browser.save_screenshot(str(tmp_path / f"{name}.png"))
    out = os.environ.get("DSV4_SCREENSHOT_DIR")
    if readme and out:
        Path(out).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(out) / "chat-page.png"))


# ---------------------------------------------------------------- tests
def test_arithmetic_in_think_high_streams_reasoning_and_answer(driver, server, tmp_path):
    url, _ = server
    open_page(driver, url)
    set_mode(driver, "think-high")
    set_tools(driver, False)  # offered tools, the demo model treats a sum as the calculator's job
    ask(driver, "Calculate 336 + 92")
    wait_idle(driver)
    shoot(driver, tmp_path, "arithmetic")
    replies = find_all(driver, ".reply")
    assert len(replies) == 1 and replies[0].get_attribute("data-state") == "done"
    reasoning = replies[0].find_element("css selector", ".reasoning")
    assert reasoning.tag_name == "details" and reasoning.is_displayed()
    assert text_of(reasoning.find_element("css selector", ".reasoning-text")).strip()
    assert "428" in text_of(replies[0].find_element("css selector", ".content"))
    assert int(stat(replies[0], "prompt")) > 0 and int(stat(replies[0], "completion")) > 0
    assert int(stat(replies[0], "cached")) >= 0
    assert stat(replies[0], "cost").startswith("$") and stat(replies[0], "ttft").endswith("ms")
    assert float(stat(replies[0], "tps")) > 0


def test_weather_tool_round_trip_runs_in_the_page(driver, server, tmp_path):
    url, _ = server
    open_page(driver, url)
    set_mode(driver, "think-high")  # the tool-call turn goes back with its reasoning, as thinking mode requires
    set_tools(driver, True)
    ask(driver, "What is the weather in Oslo?")
    wait(driver, lambda d: find_all(d, '.tool-card[data-tool="get_weather"]'), message="no get_weather card")
    wait_idle(driver)
    shoot(driver, tmp_path, "weather", readme=True)
    temp, sky = WEATHER["Oslo"]
    card = find(driver, '.tool-card[data-tool="get_weather"]')
    assert json.loads(text_of(card.find_element("css selector", ".tool-args"))) == {"city": "Oslo"}
    result = json.loads(text_of(card.find_element("css selector", ".tool-result")))
    assert result == {"city": "Oslo", "temperature_c": temp, "condition": sky}
    replies = find_all(driver, ".reply")
    assert len(replies) == 2, "the tool call, then the answer to its result"
    assert all(r.get_attribute("data-state") == "done" for r in replies)
    assert replies[0].find_elements("css selector", ".tool-card") and not replies[1].find_elements(
        "css selector", ".tool-card")
    answer = text_of(replies[1].find_element("css selector", ".content"))
    assert str(temp) in answer and sky in answer, answer


def test_page_tools_answer_as_the_demo_tools(driver, server):
    """The page's get_weather and calculator give the text `dsv4.demo.corpus` gives (what the model learned)."""
    url, _ = server
    open_page(driver, url)
    run = "return runTool(arguments[0], arguments[1])"
    for city in ("Oslo", "New York", "Atlantis"):
        assert driver.execute_script(run, "get_weather", json.dumps({"city": city})) == json.dumps(weather_report(city))
    for expression in ("336 + 92", "4821 - 9967", "1234 * 567", "84 / 7", "10 / 3", "7 / 0", "12 * 0"):
        got = driver.execute_script(run, "calculator", json.dumps({"expression": expression}))
        want = calculate(expression)
        assert got == want or (want.startswith("error") and got.startswith("error")), (expression, got, want)
    assert driver.execute_script(run, "calculator", json.dumps({"expression": "(2 + 3) * -4"})) == "-20"
    for hostile in ("alert(1)", "constructor", "2 + ", "1; 2"):  # a parser, not eval
        assert driver.execute_script(run, "calculator", json.dumps({"expression": hostile})).startswith("error")
    assert driver.execute_script(run, "get_weather", "{not json").startswith("error")


def test_stop_ends_the_request_on_the_server(driver, server, tmp_path, monkeypatch):
    url, ctx = server
    # the demo model finishes a sum in about a second; ignoring EOS makes the reply run to max_tokens, so the
    # stop lands mid-reply whatever the machine's speed
    sampling = ctx.backend._sampling
    monkeypatch.setattr(ctx.backend, "_sampling", lambda n, seed, **kw: sampling(n, seed, **{**kw, "ignore_eos": True}))
    open_page(driver, url)
    set_mode(driver, "think-high")
    set_tools(driver, False)
    max_tokens = find(driver, "#max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("3000")
    ask(driver, "Calculate 4821 + 3967")
    wait(driver, lambda d: text_of(find(d, ".reply .reasoning-text")).strip(), message="nothing streamed")
    assert running_requests(url) == 1
    stop = find(driver, "#stop")
    assert stop.tag_name == "button" and stop.is_enabled()
    stop.click()
    wait_idle(driver, timeout=10)
    shoot(driver, tmp_path, "stopped")
    reply = find(driver, ".reply")
    assert reply.get_attribute("data-state") == "stopped"
    wait(driver, lambda _: running_requests(url) == 0, timeout=10, message="the server kept generating")
    # the question and the partial reply (its reasoning so far), without tool calls
    assert driver.execute_script("return conversation.map(m => m.role).join()") == "user,assistant"
    assert driver.execute_script("return conversation[1].tool_calls === undefined")

    # New chat mid-reply: the same abort, and the reply winding down joins no conversation
    ask(driver, "Calculate 4821 + 3967")
    # the second reply's own reasoning (the stopped first reply's would satisfy a wait on the last one seen)
    wait(driver, lambda d: len(texts := find_all(d, ".reply .reasoning-text")) == 2 and text_of(texts[-1]).strip(),
         message="nothing streamed")
    find(driver, "#new-chat").click()
    wait_idle(driver, timeout=10)
    wait(driver, lambda _: running_requests(url) == 0, timeout=10, message="the server kept generating")
    assert not find_all(driver, ".turn") and driver.execute_script("return conversation.length") == 0


def test_api_key_is_asked_for_and_used(driver, tmp_path):
    ctx = build_serve_context(ModelSource(model="demo"), EngineConfig(max_batch=1), ServerConfig(api_keys=(API_KEY,)))
    with serve_in_thread(create_app(ctx)) as url:
        # the page and its assets need no key; the API does
        for path in ("/", "/ui/app.js", "/ui/style.css", "/ui/demo-tools.json"):
            with urllib.request.urlopen(url + path, timeout=5) as r:
                assert r.status == 200, path
                assert b"://" not in r.read(), f"{path} names an outside address"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/v1/models", timeout=5)
        assert err.value.code == 401

        open_page(driver, url)
        set_mode(driver, "non-think")
        set_tools(driver, True)
        assert find(driver, "#api-key").is_displayed()
        question = "What is the weather in Oslo?"
        ask(driver, question)  # no key yet
        wait_idle(driver)
        notice = find(driver, "#notice")
        assert notice.is_displayed() and "API key" in notice.text
        assert not find_all(driver, ".reply") and not find_all(driver, ".turn")
        assert find(driver, "#prompt").get_attribute("value") == question  # back in the box, to send again
        shoot(driver, tmp_path, "key-needed")

        find(driver, "#api-key").send_keys("not-the-key")
        ask(driver, question)
        wait_idle(driver)
        assert "refused" in find(driver, "#notice").text and not find_all(driver, ".turn")

        find(driver, "#api-key").clear()
        find(driver, "#api-key").send_keys(API_KEY)
        assert driver.execute_script("return sessionStorage.getItem('dsv4-api-key')") == API_KEY
        ask(driver, question)
        wait_idle(driver)
        shoot(driver, tmp_path, "key-given")
        assert not find(driver, "#notice").is_displayed()
        replies = find_all(driver, ".reply")
        assert replies and all(r.get_attribute("data-state") == "done" for r in replies)
        assert find_all(driver, '.tool-card[data-tool="get_weather"]')


def test_narrow_screen(driver, server, tmp_path):
    url, _ = server
    driver.set_window_size(390, 844)
    try:
        open_page(driver, url)
        shoot(driver, tmp_path, "phone")
        width = driver.execute_script("return document.documentElement.clientWidth")
        assert driver.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scroll
        for css in ("#prompt", "#send", "#stop", "#mode"):
            rect = find(driver, css).rect
            assert find(driver, css).is_displayed() and rect["x"] >= 0 and rect["x"] + rect["width"] <= width, css
    finally:
        driver.set_window_size(1200, 900)


def test_keyboard_and_labels(driver, server):
    """Shift+Enter is a new line and sends nothing; every control is a real button or a labelled field."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    open_page(driver, url)
    prompt = find(driver, "#prompt")
    assert driver.switch_to.active_element == prompt  # focused on load: type straight away
    prompt.send_keys("first line")
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    prompt.send_keys("second line")
    assert prompt.get_attribute("value") == "first line\nsecond line"
    assert not find_all(driver, ".turn") and driver.execute_script("return document.body.dataset.state") == "idle"
    for css in ("#send", "#stop", "#new-chat"):
        button = find(driver, css)
        assert button.tag_name == "button" and button.text.strip(), css
    for field in find_all(driver, "input, select, textarea"):
        label = driver.execute_script("return arguments[0].labels.length ? arguments[0].labels[0].textContent : ''",
                                      field)
        assert label.strip(), field.get_attribute("id")


def test_the_mode_switch_offers_what_the_model_was_trained_for(driver, server):
    """The demo never saw the think-max preamble, so its page offers non-think and think-high; a model trained for
    all three (a release, any other checkpoint or preset) gets think-max too, sent as reasoning_effort "max"."""
    from selenium.webdriver.support.select import Select

    from dsv4.demo import MODEL_DIR
    from dsv4.runtime import trained_modes
    from dsv4.serve.ui import page_config

    url, ctx = server
    open_page(driver, url)
    assert [o.get_attribute("value") for o in Select(find(driver, "#mode")).options] == ["non-think", "think-high"]
    assert page_config(ctx)["modes"] == ["non-think", "think-high"]
    assert trained_modes(ModelSource(model=str(MODEL_DIR))) == ("non-think", "think-high")
    assert trained_modes(ModelSource(model="tiny")) == ("non-think", "think-high", "think-max")
    app_js = (Path(__file__).parents[1] / "dsv4" / "serve" / "static" / "app.js").read_text()
    assert 'ui.mode.value === "think-max" ? "max" : "high"' in app_js
