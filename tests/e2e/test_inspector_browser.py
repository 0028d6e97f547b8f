"""The inspector's page in a real browser: headless Chromium (Playwright driving Debian's chromium) watches
requests made through the tunnel arrive without a reload, opens one, replays it, diffs it, reads a WebSocket log."""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import start_agent, ws_open
from .test_inspector import visit

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is required: run `bash scripts/test.sh` (pip install -e '.[test]')")
    if not shutil.which(CHROMIUM):
        pytest.fail("Chromium is required: run `bash scripts/test.sh` (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, procs, relay, origin):
    agent, name = start_agent(procs, relay, origin, "--inspect", "127.0.0.1:0", name="browsed")
    url = agent.wait_for_line(r"^inspector: (http://127\.0\.0\.1:\d+)$").group(1)
    opened = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.set_default_timeout(15_000)
    opened.goto(url + "/")
    opened.locator("#live.on").wait_for()
    yield opened, relay, name
    assert not errors, errors


def row(page, text):
    return page.locator("#list tbody tr", has_text=text)


def test_the_page_shows_replays_diffs_and_websocket_logs_live(page):
    page, relay, name = page
    page.evaluate("window.notReloaded = true")
    order = {"order": {"id": 7, "items": [1, 2]}}
    visit(relay, name, "POST", "/echo", json.dumps(order).encode(), {"Content-Type": "application/json"})

    # it appears without a reload, and opens on a click with the JSON pretty-printed
    original = row(page, "/echo")
    original.wait_for()
    original_id = original.get_attribute("data-id")
    original.click()
    pretty = page.locator("#tab-request pre.json")
    pretty.wait_for()
    assert pretty.inner_text() == json.dumps(order, indent=2)
    page.locator('#tabs button[data-tab="response"]').click()
    assert page.locator("#response-body pre.json").inner_text() == json.dumps(order, indent=2)

    # Replay: a new entry, marked as a replay of the original
    page.locator("#replay").click()
    replayed = page.locator("#list tbody tr", has_text=f"replay of #{original_id}")
    replayed.wait_for()
    assert page.locator("#list tbody tr").count() == 2

    # an edited replay (another Content-Type), then the diff marks the changed response header
    row(page, "/echo").filter(has_not_text="replay of").click()
    page.locator("#edit").click()
    headers = page.locator("#edit-headers")
    headers.fill(headers.input_value().replace("Content-Type: application/json", "Content-Type: text/plain"))
    page.locator("#edit-send").click()
    page.locator("#list tbody tr", has_text=f"replay of #{original_id}").nth(1).wait_for()
    assert page.locator("#diff-with").input_value() == original_id  # the edited replay is selected
    page.locator("#diff").click()
    changed = page.locator('table.diff-headers tr.changed[data-header="content-type"]')
    changed.wait_for()
    assert "application/json" in changed.inner_text() and "text/plain" in changed.inner_text()
    assert page.locator('table.diff-headers tr.same[data-header="connection"]').count() == 1

    # a WebSocket conversation: both messages in its log
    with ws_open(relay, name) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "Echo: hello"
    websocket = page.locator("#list tbody tr", has=page.locator(".badge.ws"))
    websocket.wait_for()
    websocket.click()
    log = page.locator("#tab-messages table.messages")
    log.wait_for()
    page.locator("#tab-messages tr.msg.in", has_text="Echo: hello").wait_for()
    texts = page.locator("#tab-messages tr.msg td.data").all_inner_texts()
    assert texts[:2] == ["hello", "Echo: hello"]
    assert page.evaluate("window.notReloaded") is True


def test_filters_narrow_the_list(page):
    page, relay, name = page
    visit(relay, name, path="/status/404")
    visit(relay, name, path="/")
    visit(relay, name, "POST", "/echo", b"x")
    page.locator("#list tbody tr").nth(2).wait_for()
    page.locator("#filter-status").select_option("4xx")
    assert page.locator("#list tbody tr").all_inner_texts()[0].split("\t")[2] == "/status/404"
    assert page.locator("#list tbody tr").count() == 1
    page.locator("#filter-status").select_option("")
    page.locator("#filter-method").select_option("POST")
    assert page.locator("#list tbody tr").count() == 1
    page.locator("#filter-method").select_option("")
    page.locator("#filter-path").fill("stat")
    assert page.locator("#list tbody tr").count() == 1
    assert "path=stat" in page.locator("#export").get_attribute("href")
