"""The web page in a real browser: Debian's Chromium, headless, driven by
Playwright, against two servers.

``apps``: the real apps as processes on free loopback ports, the server
configured with a third client where nothing listens, so every round drops
it and the page must say why. The clients up and down, the form and its
errors, a live run from the form, stop and resume, and every view agreeing
while a paced run arrives are shown over these. (On the server in this
process the last saw only the first and the last of 8 rounds, every time:
it samples the page from Python every 20 ms, and the server's charts were
then drawn by the same interpreter.)

``local``: the seed's server app over its two client apps in this process
(conftest's ``seed_federation``), served on a free loopback port: the same
page and API, every client answering, for the rest: past runs, a strategy
from the form and each strategy's math and state, runs compared, a run of
1003 rounds (over HTTP, the dead client's 0.2 s pause before its retry made
that one run last four minutes), secure aggregation and DP. Fifty clients
and a suspicious one are servers in this process too, and so is a round of 300
clients, half of them lost with their host, shown as a summary.

UPDATE_SCREENSHOT=1 writes the screenshot to docs/screenshot.png (the one
the README shows); otherwise it goes to the test's temporary folder.
"""
from __future__ import annotations

import json
import os
import random
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, Page

import launcher
from conftest import ROOT, Federated, Served
from fedavg.http.client_app import create_app as create_client_app
from fedavg.scenarios import make_clients
from fedavg.strategies import RULES, STRATEGIES
from fedavg.trace import explain_average, fmt, fmt_line
from fedavg_server.inprocess import federation_app

# Real processes, a browser or fuzzing: make test-all (docs/TESTS.md).
pytestmark = pytest.mark.system

ROUNDS = 5
# Rounds arrive one by one, each a visible step. The page shows a round
# together with its three charts (drawn by matplotlib, ~0.5 s for the three
# on a 2-core machine, several times that on a busy one), so a round must
# last well longer than that to be seen alone.
PACE_S = 1.5


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """client_1, client_2 and the server, configured with a third client URL
    whose port is bound but never listens: connecting is refused at once, and
    no other process can take the port while the tests run."""
    db = tmp_path_factory.mktemp("page") / "runs.db"
    with launcher.refusing_url() as dead:
        apps: dict[str, launcher.App] = {}
        try:
            for name in ("client_1", "client_2"):
                apps[name] = launcher.start_app(name, launcher.free_port())
            clients = ",".join([apps["client_1"].url, apps["client_2"].url, dead])
            apps["server"] = launcher.start_app("server", launcher.free_port(),
                                                ["--clients", clients, "--db", str(db)])
            launcher.wait_healthy(list(apps.values()))
            yield apps["server"].url, dead
        finally:
            launcher.stop(list(apps.values()))


@pytest.fixture(scope="module")
def local(seed_federation):
    """The seed's server app over its two client apps in this process, on a
    free loopback port (a thread): yields its URL."""
    served = Served(seed_federation.app)
    yield served.url
    served.close()


def open_tab(browser: Browser, url: str) -> Iterator[Page]:
    """A fresh tab on the page at url; fails the test if the page logged an
    error (other than the 400 a rejected form gets: that is the API answering)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 400" not in m.text
           else None)
    tab.goto(url + "/")
    yield tab
    context.close()
    assert errors == []


@pytest.fixture
def page(browser: Browser, apps) -> Iterator[Page]:
    """A tab on the real apps' page."""
    yield from open_tab(browser, apps[0])


@pytest.fixture
def local_page(browser: Browser, local) -> Iterator[Page]:
    """A tab on the page of the server in this process."""
    yield from open_tab(browser, local)


def rows(page: Page) -> int:
    return page.locator("#rounds tbody tr").count()


def wait_status(page: Page, status: str, timeout_ms: float = 20_000) -> None:
    page.wait_for_function(f"document.querySelector('#run-status').dataset.status === '{status}'",
                           timeout=timeout_ms)


def text(page: Page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def w_text(w) -> str:
    """w as the page writes it: one number, or [w1, w2, …] with several features."""
    return fmt(w) if not isinstance(w, list) else "[" + ", ".join(fmt(v) for v in w) + "]"


def assert_round_shown(page: Page, record: dict, dead: str | None) -> None:
    """Every number the page writes for this round equals GET /runs/<id>, in
    the log's format; ``dead`` is the client that is down, if there is one."""
    assert text(page, "#round-number") == str(record["round"])
    model_in = record["global_model_in"]
    assert text(page, '#math [data-field="model_in"]') == f"w={w_text(model_in['w'])} b={fmt(model_in['b'])}"
    terms = page.locator("#terms tbody tr")
    assert terms.count() == len(record["participants"])
    for p, t in zip(record["participants"], record["terms"]):
        row = page.locator(f'#terms tbody tr[data-client="{p["client_id"]}"]')
        cell = lambda field: row.locator(f'[data-field="{field}"]').inner_text()  # noqa: E731
        assert cell("n_k") == str(p["data_size"]) == str(t["n_k"])
        assert cell("weight") == fmt(t["weight"])  # n_k/N
        assert cell("w") == w_text(p["local_model"]["w"])
        assert cell("b") == fmt(p["local_model"]["b"])
        assert cell("term_w") == w_text(t["w"])  # n_k/N · w_k
        assert cell("term_b") == fmt(t["b"])
    assert text(page, '#terms [data-field="N"]') == str(record["N"])
    assert text(page, '#terms [data-field="global_w"]') == w_text(record["global_model"]["w"])
    assert text(page, '#terms [data-field="global_b"]') == fmt(record["global_model"]["b"])
    # the weighted average written out exactly as the server's log writes it
    ps = record["participants"]
    lines = explain_average([p["data_size"] for p in ps],
                            [np.append(p["local_model"]["w"], p["local_model"]["b"]) for p in ps],
                            np.append(record["global_model"]["w"], record["global_model"]["b"]))
    assert page.locator("#average-lines").inner_text().strip() == "\n".join(lines)
    assert text(page, '#math [data-field="federated_loss"]') == fmt(record["federated_loss"])
    dropped = page.locator("#dropped li")
    if dead is None:  # every client answered: none dropped, none shown as dropped
        assert record["dropped"] == [] and dropped.count() == 0
    else:  # the client that is not there: dropped, with the reason the server gave
        assert [d["url"] for d in record["dropped"]] == [dead]
        assert dropped.count() == 1
        assert dropped.get_attribute("data-client") == record["dropped"][0]["client_id"]
        reason = dropped.locator('[data-field="reason"]').inner_text()
        assert reason == record["dropped"][0]["reason"] and "Connection refused" in reason
    # and its line in the table of all rounds
    row = page.locator(f'#rounds tbody tr[data-round="{record["round"]}"]')
    assert row.locator('[data-field="w"]').inner_text() == w_text(record["global_model"]["w"])
    assert row.locator('[data-field="b"]').inner_text() == fmt(record["global_model"]["b"])
    assert row.locator('[data-field="federated_loss"]').inner_text() == fmt(record["federated_loss"])


def test_the_federation_shows_each_client_up_or_down(page: Page, apps):
    url, dead = apps
    page.wait_for_function("document.querySelector('#clients-summary').textContent !== ''")
    states = {c["url"]: c for c in get_json(url + "/clients")["clients"]}
    assert [c["status"] for c in states.values()] == ["up", "up", "down"]
    for row in page.locator("#clients tbody tr").all():
        c = states[row.get_attribute("data-url")]
        assert row.locator('[data-field="client_id"]').inner_text() == c["client_id"]
        if c["status"] == "up":
            assert row.locator('[data-field="status"]').inner_text() == "up"
            assert row.locator('[data-field="n_k"]').inner_text() == str(c["n_k"]) == "2"
        else:
            assert c["url"] == dead and "Connection refused" in c["reason"]
            assert row.locator('[data-field="status"]').inner_text() == f"down: {c['reason']}"
    assert text(page, "#clients-summary").startswith("2 of 3 client(s) up; N = 4 samples")


def test_a_validation_error_is_shown_next_to_its_field(page: Page, apps):
    url, _ = apps
    before = len(get_json(url + "/runs")["runs"])
    page.fill("#f-lr", "-1")
    page.click("#start-button")
    page.wait_for_function("document.querySelector('#lr-error').textContent !== ''")
    assert text(page, "#lr-error") == "must be > 0, got -1"  # the API's "lr: must be > 0, got -1"
    assert page.get_attribute("#f-lr", "aria-invalid") == "true"
    assert "lr-error" in page.get_attribute("#f-lr", "aria-describedby")
    # editing the field clears its message; the next error lands next to its own field
    page.fill("#f-lr", "0.01")
    assert text(page, "#lr-error") == ""
    page.fill("#f-rounds", "0")
    page.click("#start-button")
    page.wait_for_function("document.querySelector('#rounds-error').textContent !== ''")
    assert text(page, "#rounds-error") == "must be >= 1, got 0"
    assert len(get_json(url + "/runs")["runs"]) == before  # nothing started


def test_a_run_from_the_form_arrives_round_by_round_with_the_api_numbers(page: Page, apps, tmp_path):
    url, dead = apps
    page.evaluate(OBSERVE_JS)  # every state the page shows, from here on
    page.fill("#f-rounds", str(ROUNDS))
    page.fill("#f-pace_s", str(PACE_S))
    page.fill("#f-seed", "3")
    page.click("#start-button")
    wait_status(page, "running")
    run_id = int(page.input_value("#run-select"))
    assert page.get_attribute("#download-json", "href") == f"/runs/{run_id}"
    assert page.get_attribute("#download-csv", "href") == f"/runs/{run_id}?format=csv"
    wait_status(page, "completed")
    # The rounds arrived one by one while the run went on: each shown on its
    # own with its progress, in order, before the run read completed (no
    # round skipped, none shown only at the end).
    states = [(s["table_rows"], s["progress_text"], s["status"]) for s in page.evaluate("window.__samples")
              if s["status_run"] == run_id and s["table_rows"]]
    shown = list(dict.fromkeys((rows_, progress) for rows_, progress, _ in states))
    assert shown == [(k, f"{k} / {ROUNDS} rounds") for k in range(1, ROUNDS + 1)], shown
    assert all(any(r == k and status == "running" for r, _, status in states) for k in range(1, ROUNDS)), states
    wait_status(page, "completed")
    assert page.evaluate("[document.querySelector('#progress').value, document.querySelector('#progress').max]") \
        == [ROUNDS, ROUNDS]

    run = get_json(f"{url}/runs/{run_id}")
    assert run["status"] == "completed" and len(run["rounds"]) == ROUNDS
    # "completed" does not hide the client that never took part: a warning says so
    assert run["warnings"] and f"dropped in {ROUNDS}/{ROUNDS} rounds" in run["warnings"][0]
    page.wait_for_function("!document.querySelector('#run-warnings').hidden")
    assert page.locator("#run-warnings li").all_inner_texts() == run["warnings"]
    # the last round's loss comes from the final /evaluate, after the last round: the page has it too
    page.wait_for_function(f"document.querySelector('#math [data-field=\"federated_loss\"]').textContent === "
                           f"'{fmt(run['rounds'][-1]['federated_loss'])}'")
    assert_round_shown(page, run["rounds"][-1], dead)
    # every other round, picked from the table by keyboard
    for record in run["rounds"][:-1]:
        page.focus(f'#rounds button[data-round="{record["round"]}"]')
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.querySelector('#round-number').textContent === '{record['round']}'")
        assert_round_shown(page, record, dead)
    assert not page.is_checked("#follow")  # a round picked by hand stays picked

    # the charts, drawn by the server for this run
    page.click("#round-next")  # from round ROUNDS - 1 to the last
    page.wait_for_function(f"document.querySelector('#chart-models').alt.startsWith('Run {run_id}, round {ROUNDS}:')")
    page.wait_for_function("[...document.querySelectorAll('img[data-plot]')].every("
                           "i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 300)")
    assert page.is_checked("#follow")  # back on the last round: following again

    # downloads: the JSON and CSV of the run, as the API gives them
    with page.expect_download() as download:
        page.click("#download-csv")
    assert Path(download.value.path()).read_text() == get_text(f"{url}/runs/{run_id}?format=csv")
    with page.expect_download() as download:
        page.click("#download-json")
    assert json.loads(Path(download.value.path()).read_text()) == run

    # the screenshot: the last round, its arithmetic, the dropped client, the charts
    shot = ROOT / "docs" / "screenshot.png" if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "page.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000


def test_past_runs_are_selectable(local_page: Page, local):
    url = local
    status, first = launcher.post_json(url + "/start", {"rounds": 3, "seed": 5})
    assert status == 200 and first["status"] == "completed"
    # a second run, started from the form with the keyboard alone
    local_page.focus("#f-rounds")
    local_page.keyboard.press("Control+A")
    local_page.keyboard.type("2")
    local_page.keyboard.press("Enter")
    second = first["run_id"] + 1  # the server's next run id
    local_page.wait_for_function(
        f"document.querySelector('#run-status').textContent.startsWith('Run {second} is completed')")
    assert local_page.input_value("#run-select") == str(second)
    assert text(local_page, "#progress-text") == "2 / 2 rounds"

    local_page.select_option("#run-select", str(first["run_id"]))
    local_page.wait_for_function("document.querySelector('#progress-text').textContent === '3 / 3 rounds'")
    assert text(local_page, "#run-status").startswith(f"Run {first['run_id']} is completed")
    local_page.wait_for_function("document.querySelector('#round-number').textContent === '3'")
    assert_round_shown(local_page, first["rounds"][-1], None)
    assert local_page.locator("#rounds tbody tr").count() == 3


def test_the_page_writes_numbers_exactly_as_the_log_does(page: Page):
    """The page's own fmt (a global of numbers.js, a classic script: no hook is
    shipped for the test) against fedavg.trace.fmt, on the cases where a
    naive JS port goes wrong (ties, which Python rounds to even; the
    exponent's two digits; -0.0) and on many random doubles."""
    rng = random.Random(4)
    values = [999999.5, 1e6, 999999.9999996]  # the edge of scientific notation, 10⁶
    values += [0.0, -0.0, 1.0, -1.0, 0.5, 0.0078125, -0.0078125, 2 ** -11, 12345665.0, 12345675.0, 9999999.5,
               9999999.9999999, 0.001, 0.00099999999, 1e-7, 1e7, 1e21, 1e300, 5e-324, 123.4567895, 2.5e-5,
               -3.14159265358979, 1 / 3, 2 / 3, 1.0000005, 0.9999995]
    values += [rng.uniform(-1, 1) * 10 ** rng.uniform(-12, 12) for _ in range(2_000)]
    values += [rng.randrange(1, 2 ** 20) / 2 ** rng.randrange(1, 30) for _ in range(500)]  # dyadic: exact ties
    assert page.evaluate("xs => xs.map(x => fmt(x))", values) == [fmt(v) for v in values]
    # and a model as an equation (fmt_line): signs, -0.0, a blown-up model, several features
    models = [([w], b) for w, b in zip(values[:300], values[300:600])] + \
        [([2.78953], -1.374227), ([-3.2e130], -0.0), ([1.0, -2.0, 0.5], 4.5e6)]
    assert page.evaluate("ms => ms.map(([w, b]) => fmtLine(w.length === 1 ? w[0] : w, b))", models) == \
        [fmt_line(w, b) for w, b in models]


def test_a_run_can_be_stopped_and_resumed_from_the_page(page: Page, apps):
    url, _ = apps
    page.fill("#f-rounds", "40")
    page.fill("#f-pace_s", "0.1")
    page.click("#start-button")
    wait_status(page, "running", 5_000)
    run_id = int(page.input_value("#run-select"))
    assert page.is_hidden("#run-resume")
    page.wait_for_function("document.querySelectorAll('#rounds tbody tr').length >= 2")
    page.click("#run-stop")
    wait_status(page, "interrupted")
    assert page.is_hidden("#run-stop") and page.is_visible("#run-resume")
    stopped = get_json(f"{url}/runs/{run_id}")
    assert stopped["status"] == "interrupted" and len(stopped["rounds"]) < 40
    assert text(page, "#progress-text") == f"{len(stopped['rounds'])} / 40 rounds"
    page.click("#run-resume")
    wait_status(page, "completed", 30_000)
    assert text(page, "#progress-text") == "40 / 40 rounds"
    assert get_json(f"{url}/runs/{run_id}")["status"] == "completed"


# --- strategies: the form, each round's own math, and runs compared ---------------------------


def start_run(url: str, body: dict) -> dict:
    """A run started over the API, waited for: the page then shows it as a past run."""
    status, run = launcher.post_json(url + "/start", body)
    assert status == 200 and run["status"] == "completed", run
    return run


def start_from_form(page: Page, url: str) -> dict:
    """Start the run the form says, wait until the page shows it completed: its API record."""
    run_id = max([r["run_id"] for r in get_json(url + "/runs")["runs"]], default=0) + 1  # the server's next id
    page.click("#start-button")
    page.wait_for_function(
        f"document.querySelector('#run-status').textContent.startsWith('Run {run_id} is completed')")
    return get_json(f"{url}/runs/{run_id}")


def show_round(page: Page, run_id: int, round_no: int) -> None:
    """Pick a past run in the list (unless the page, freshly loaded, already
    shows it as the newest run), then one of its rounds by number."""
    page.wait_for_function("document.querySelector('#run-status').textContent.startsWith('Run ')")
    if not text(page, "#run-status").startswith(f"Run {run_id} is "):
        page.select_option("#run-select", str(run_id))
        page.wait_for_function(f"document.querySelector('#run-status').textContent.startsWith('Run {run_id} is ')")
    page.fill("#round-input", str(round_no))
    page.dispatch_event("#round-input", "change")
    page.wait_for_function(f"document.querySelector('#round-number').textContent === '{round_no}'")


# The chosen option's text and its summary line (kind: strategy or aggregator), measured where
# the page draws them: the text's width in the select's own font against the room inside the
# select (its padding and the arrow's 1.5em out), the summary's box against its own scroll width
# and the form's right edge.
MEASURE_CHOICE = """(kind) => {
  const select = document.querySelector(`#f-${kind}`);
  const style = getComputedStyle(select);
  const probe = document.createElement('span');
  probe.style.cssText = 'position:absolute;visibility:hidden;white-space:pre';
  probe.style.font = style.font;
  probe.textContent = select.selectedOptions[0].textContent;
  document.body.append(probe);
  const needed = probe.getBoundingClientRect().width;
  probe.remove();
  const summary = document.querySelector(`#${kind}-summary`);
  const box = summary.getBoundingClientRect();
  return {option: select.selectedOptions[0].textContent, needed,
          room: select.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)
                - 1.5 * parseFloat(style.fontSize),
          summary: summary.textContent, scroll: summary.scrollWidth, client: summary.clientWidth,
          right: box.right, height: box.height, formRight: summary.closest('form').getBoundingClientRect().right};
}"""


@pytest.mark.parametrize("kind, registry", [("strategy", STRATEGIES), ("aggregator", RULES)])
def test_each_strategy_and_rule_option_and_its_summary_are_readable_whole(local_page: Page, kind, registry):
    """Issue 19: the drop-down showed "fedavg — W_{t+1} = Σ_k … the sam", cut at the select's
    edge. Each option's text fits inside the select, and the line below it shows the
    strategy's (or the robust rule's) whole summary, wrapped inside the form rather than clipped."""
    for name, chosen in registry.items():
        local_page.select_option(f"#f-{kind}", name)
        seen = local_page.evaluate(MEASURE_CHOICE, kind)
        assert seen["option"].startswith(name) and seen["needed"] <= seen["room"], seen
        assert seen["summary"] == chosen.summary, seen
        assert seen["height"] > 0 and seen["scroll"] <= seen["client"] and seen["right"] <= seen["formRight"], seen


def test_the_form_starts_a_median_run_and_shows_a_rules_bad_setting_next_to_it(local_page: Page, local):
    """Issue 19: /start took "aggregator", the page's form had no field for it. The weighted
    mean first (not sent); a rule's own settings shown for it alone; median picked starts
    a run whose record says median and whose every round is the median's math."""
    url = local
    assert local_page.input_value("#f-aggregator") == "mean"
    assert text(local_page, "#aggregator-summary") == RULES["mean"].summary
    assert local_page.is_hidden("#f-aggregator-trimmed_mean-trim")
    local_page.select_option("#f-aggregator", "trimmed_mean")
    assert local_page.is_visible("#f-aggregator-trimmed_mean-trim")
    assert local_page.is_hidden("#f-aggregator-krum-byzantine")
    # a bad value of its own is shown next to it, as the API names it; nothing starts
    before = len(get_json(url + "/runs")["runs"])
    local_page.fill("#f-aggregator-trimmed_mean-trim", "0.5")
    local_page.click("#start-button")
    local_page.wait_for_function("document.querySelector('#aggregator-trimmed_mean-trim-error').textContent !== ''")
    assert text(local_page, "#aggregator-trimmed_mean-trim-error") == "must be < 0.5, got 0.5"
    assert local_page.get_attribute("#f-aggregator-trimmed_mean-trim", "aria-invalid") == "true"
    # and a rule the strategy cannot take, next to the select
    local_page.select_option("#f-strategy", "exact")
    local_page.select_option("#f-aggregator", "median")
    local_page.click("#start-button")
    local_page.wait_for_function("document.querySelector('#aggregator-error').textContent !== ''")
    assert "strategy exact" in text(local_page, "#aggregator-error") and text(local_page, "#form-error") == ""
    assert len(get_json(url + "/runs")["runs"]) == before

    local_page.select_option("#f-strategy", "fedavg")
    assert text(local_page, "#aggregator-summary") == RULES["median"].summary
    assert local_page.is_hidden("#f-aggregator-trimmed_mean-trim")  # not sent: median refuses trim
    local_page.fill("#f-rounds", "2")
    run = start_from_form(local_page, url)
    assert run["settings"]["robust"]["aggregator"] == "median" and run["settings"]["strategy"] == "fedavg"
    assert all(r["math"][0].startswith("w = median of the 2 clients' values = ") for r in run["rounds"])


def test_the_form_starts_a_scaffold_run_with_its_own_server_lr(local_page: Page, local):
    url = local
    # FedAvg first, with nothing of its own to set; every other strategy's settings hidden
    assert local_page.input_value("#f-strategy") == "fedavg"
    assert text(local_page, "#strategy-summary") == STRATEGIES["fedavg"].summary
    assert local_page.is_hidden("#f-scaffold-server_lr") and local_page.is_hidden("#f-fedprox-mu")
    # mu belongs to FedProx alone, with the default the server gives it
    local_page.select_option("#f-strategy", "fedprox")
    assert local_page.is_visible("#f-fedprox-mu") and local_page.input_value("#f-fedprox-mu") == "0.01"
    local_page.select_option("#f-strategy", "scaffold")
    assert text(local_page, "#strategy-summary") == STRATEGIES["scaffold"].summary
    assert local_page.is_hidden("#f-fedprox-mu") and local_page.is_hidden("#f-fedadam-server_lr")
    # the setting as fedavg.strategies defines it: its default and bounds
    param = next(p for p in STRATEGIES["scaffold"].params if p.name == "server_lr")
    assert local_page.input_value("#f-scaffold-server_lr") == f"{param.default:g}"
    assert local_page.get_attribute("#f-scaffold-server_lr", "max") == f"{param.le:g}"
    assert f"0 < server_lr ≤ {param.le:g}" in text(local_page, "#scaffold-server_lr-help")
    assert local_page.inner_text('label[for="f-scaffold-server_lr"]') == "server_lr"

    local_page.fill("#f-rounds", "2")
    local_page.fill("#f-scaffold-server_lr", "0.5")
    run = start_from_form(local_page, url)
    run_id = run["run_id"]
    assert run["settings"]["strategy"] == "scaffold" and run["settings"]["params"] == {"server_lr": 0.5}
    assert "mu" not in json.dumps(run["settings"]["params"])
    assert text(local_page, "#run-status").startswith(f"Run {run_id} is completed: scaffold (server_lr={fmt(0.5)}), ")
    # and its last round: SCAFFOLD's math, each client's control-variate update, the server's c
    record = run["rounds"][-1]
    local_page.wait_for_function("document.querySelector('#math [data-field=\"strategy\"]') !== null")
    assert text(local_page, '#math [data-field="strategy"]') == "scaffold"
    assert local_page.locator("#average-lines").inner_text().strip() == "\n".join(record["math"])
    for p in record["participants"]:
        row = local_page.locator(f'#terms tbody tr[data-client="{p["client_id"]}"]')
        assert row.locator('[data-field="control_delta_w"]').inner_text() == w_text(p["control_delta"]["w"])
        assert row.locator('[data-field="control_delta_b"]').inner_text() == fmt(p["control_delta"]["b"])
    c = record["server_state"]["c"]
    assert local_page.locator('#server-state tr[data-state="c"] [data-field="w"]').inner_text() == fmt(c[0])
    assert local_page.locator('#server-state tr[data-state="c"] [data-field="b"]').inner_text() == fmt(c[1])


def test_an_out_of_range_strategy_setting_is_shown_next_to_its_field(page: Page, apps):
    url, _ = apps
    before = len(get_json(url + "/runs")["runs"])
    page.select_option("#f-strategy", "fedadam")
    page.fill("#f-fedadam-beta1", "1")
    page.click("#start-button")
    page.wait_for_function("document.querySelector('#fedadam-beta1-error').textContent !== ''")
    assert text(page, "#fedadam-beta1-error") == "must be < 1, got 1"  # the API's "beta1: must be < 1, got 1"
    assert page.get_attribute("#f-fedadam-beta1", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "f-fedadam-beta1"
    # the other strategies' beta1 (hidden, not sent) carry no message
    assert page.locator("#fedyogi-beta1-error").inner_text() == ""
    assert text(page, "#form-error") == ""
    page.fill("#f-fedadam-beta1", "0.9")
    assert text(page, "#fedadam-beta1-error") == ""
    assert len(get_json(url + "/runs")["runs"]) == before  # nothing started


def test_a_fedadam_round_shows_its_math_and_its_m_and_v(local_page: Page, local):
    url = local
    run = start_run(url, {"strategy": "fedadam", "rounds": 3, "seed": 11, "server_lr": 0.2})
    local_page.reload()
    show_round(local_page, run["run_id"], 2)
    record = run["rounds"][1]
    assert text(local_page, '#math [data-field="strategy"]') == "fedadam"
    assert text(local_page, '#math [data-field="summary"]') == STRATEGIES["fedadam"].summary
    assert local_page.locator("#average-lines").inner_text().strip() == "\n".join(record["math"])
    assert any(line.startswith("m_w = ") for line in record["math"])
    assert set(record["server_state"]) == {"m", "v"}
    for key, values in record["server_state"].items():
        row = local_page.locator(f'#server-state tr[data-state="{key}"]')
        assert row.locator('[data-field="w"]').inner_text() == fmt(values[0])
        assert row.locator('[data-field="b"]').inner_text() == fmt(values[1])
    # FedAdam averages local models first: each client's share is there too
    assert local_page.locator("#terms tbody tr").count() == len(record["participants"]) == len(record["terms"])


def test_a_fedsgd_round_shows_what_each_client_sent(local_page: Page, local):
    url = local
    run = start_run(url, {"strategy": "fedsgd", "rounds": 2, "seed": 2})
    local_page.reload()
    show_round(local_page, run["run_id"], 2)
    record = run["rounds"][1]
    assert record["terms"] == []
    assert local_page.locator("#average-lines").inner_text().strip() == "\n".join(record["math"])
    for p in record["participants"]:
        row = local_page.locator(f'#terms tbody tr[data-client="{p["client_id"]}"]')
        assert row.locator('[data-field="gradient_w"]').inner_text() == w_text(p["gradient"]["w"])
        assert row.locator('[data-field="gradient_b"]').inner_text() == fmt(p["gradient"]["b"])
        assert row.locator('[data-field="w"]').count() == 0  # no local model, no column for one
    assert local_page.locator("#server-state").count() == 0  # FedSGD keeps no state
    # its model-lines chart draws (the global lines only)
    local_page.wait_for_function("document.querySelector('#chart-models').src.startsWith('blob:')"
                           " && document.querySelector('#chart-models').naturalWidth > 300")


def test_the_comparison_view_overlays_two_runs(local_page: Page, local):
    url = local
    first = start_run(url, {"strategy": "fedavg", "rounds": 4, "seed": 1})
    second = start_run(url, {"strategy": "fedadam", "rounds": 4, "seed": 1})
    local_page.reload()
    for run in (first, second):
        local_page.check(f"#compare-{run['run_id']}")
    local_page.click("#compare-button")
    local_page.wait_for_function("document.querySelector('#chart-compare').src.startsWith('blob:')"
                           " && document.querySelector('#chart-compare').naturalWidth > 300")
    assert local_page.is_visible("#chart-compare")
    assert local_page.get_attribute("#chart-compare", "data-runs") == f"{first['run_id']},{second['run_id']}"
    # the picture the page shows: one line per run, each labelled with its run and strategy
    svg = local_page.evaluate("fetch(document.querySelector('#chart-compare').src).then(r => r.text())")
    root = ET.fromstring(svg)
    line_ids = {g.get("id") for g in root.iter("{http://www.w3.org/2000/svg}g")
                if (g.get("id") or "").startswith("run-")}
    assert line_ids == {f"run-{first['run_id']}", f"run-{second['run_id']}"}
    for run, strategy in ((first, "fedavg"), (second, "fedadam")):
        assert f"<!-- run {run['run_id']}: {strategy} -->" in svg  # the legend's text


# --- one state: every view shows the same run and round ----------------------------------

# Read in one go (page.evaluate runs between the page's own tasks): the round
# count of the run menu, the progress bar, the round in the title and in the
# math panel, and the round and run each chart was drawn for.
SAMPLE_JS = """() => {
  const n = (t) => (t === undefined || t === null || t === '' || t === '–' ? 0 : Number(t));
  const option = document.querySelector('#run-select').selectedOptions[0];
  const menu = option ? option.textContent.match(/^Run (\\d+): \\w+, (\\d+)\\/(\\d+) rounds$/) : null;
  const status = document.querySelector('#run-status').textContent.match(/^Run (\\d+) is/);
  const charts = [...document.querySelectorAll('img[data-plot]')];
  return {
    menu_run: menu ? Number(menu[1]) : null, menu_rounds: menu ? Number(menu[2]) : null,
    status_run: status ? Number(status[1]) : null,
    status: document.querySelector('#run-status').dataset.status,
    progress: Number(document.querySelector('#progress').value),
    progress_text: document.querySelector('#progress-text').textContent,
    title_round: n(document.querySelector('#round-number').textContent),
    math_round: n(document.querySelector('#math').dataset.round),
    table_rows: document.querySelectorAll('#rounds tbody tr').length,
    chart_rounds: charts.map((i) => n(i.dataset.round)),
    chart_runs: charts.map((i) => n(i.dataset.run)),
  };
}"""

# Every change the page makes to its DOM is sampled as well: a MutationObserver's
# callback runs after the script that made the changes, so a view updated
# in a later step than the others would be caught in between.
OBSERVE_JS = f"""() => {{
  window.__samples = [];
  const sample = {SAMPLE_JS};
  new MutationObserver(() => window.__samples.push(sample()))
    .observe(document.body, {{subtree: true, childList: true, attributes: true, characterData: true}});
}}"""


def assert_one_round(sample: dict, run_id: int) -> None:
    rounds = sample["menu_rounds"]
    assert sample["menu_run"] == sample["status_run"] == run_id, sample
    assert sample["chart_runs"] == [run_id] * 3, sample
    assert sample["progress"] == sample["table_rows"] == rounds, sample
    assert sample["progress_text"].startswith(f"{rounds} / "), sample
    # following the latest round: the math and every chart show round `rounds`
    assert sample["title_round"] == sample["math_round"] == rounds, sample
    assert sample["chart_rounds"] == [rounds] * 3, sample


def test_every_view_shows_the_same_round_while_a_paced_run_arrives(page: Page, apps):
    url, _ = apps
    rounds = 8
    page.wait_for_function("document.querySelector('#run-status').textContent !== ''")
    page.evaluate(OBSERVE_JS)
    page.fill("#f-rounds", str(rounds))
    page.fill("#f-pace_s", str(PACE_S))
    page.click("#start-button")
    page.wait_for_function("document.querySelector('#run-status').dataset.status === 'running'")
    run_id = int(page.input_value("#run-select"))
    samples = []
    deadline = time.monotonic() + 40
    while True:
        sample = page.evaluate(SAMPLE_JS)
        samples.append(sample)
        if sample["menu_rounds"] == rounds and "completed" in page.locator("#run-status").get_attribute("data-status"):
            break
        assert time.monotonic() < deadline, f"the run did not complete on the page in 40 s: {sample}"
        page.wait_for_timeout(20)  # sampling interval, not a wait for anything
    observed = [s for s in page.evaluate("window.__samples") if s["status_run"] == run_id]
    for sample in samples + observed:
        assert_one_round(sample, run_id)
    # the samples saw the rounds arrive, not just the end
    seen = {s["menu_rounds"] for s in samples + observed}
    assert len(seen) >= 4 and rounds in seen, seen
    assert len(get_json(f"{url}/runs/{run_id}")["rounds"]) == rounds


# --- the form: every bad field at once -----------------------------------------------------


def test_every_bad_field_is_shown_at_once_next_to_its_field(page: Page, apps):
    url, _ = apps
    before = len(get_json(url + "/runs")["runs"])
    page.fill("#f-rounds", "0")
    page.fill("#f-lr", "0")
    page.fill("#f-fraction", "2")
    page.click("#start-button")
    page.wait_for_function("document.querySelector('#fraction-error').textContent !== ''")
    # the API's own messages, each next to its field
    status, body = launcher.post_json(url + "/start", {"rounds": 0, "lr": 0, "fraction": 2})
    assert status == 400 and body["error"] == "lr: must be > 0, got 0"
    assert {e["field"]: e["message"] for e in body["errors"]} == {
        "lr": "must be > 0, got 0", "rounds": "must be >= 1, got 0", "fraction": "must be <= 1, got 2"}
    assert text(page, "#lr-error") == "must be > 0, got 0"
    assert text(page, "#rounds-error") == "must be >= 1, got 0"
    assert text(page, "#fraction-error") == "must be <= 1, got 2"
    for name in ("lr", "rounds", "fraction"):
        assert page.get_attribute(f"#f-{name}", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "f-lr"  # the first error's field
    assert text(page, "#form-error") == ""
    assert len(get_json(url + "/runs")["runs"]) == before  # nothing started


# --- fifty clients: counted, collapsed, searchable --------------------------------------------

K = 50


@pytest.fixture(scope="module")
def fifty(tmp_path_factory):
    """A client host app of 50 IID clients and a server configured with each
    of them, in this process, the server on a free loopback port."""
    server = Federated(federation_app(make_clients("iid", K), tmp_path_factory.mktemp("fifty") / "runs.db"))
    served = Served(server.app)
    yield served.url, server.fed.transport.urls
    served.close()
    server.close()


def test_fifty_clients_are_summarised_collapsed_and_searchable(browser: Browser, fifty):
    url, urls = fifty
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(url + "/")
        page.wait_for_function("document.querySelector('#clients-summary').dataset.up !== undefined")
        assert text(page, "#clients-summary").startswith(f"{K} of {K} client(s) up; N = {20 * K} samples")
        assert page.get_attribute("#clients-summary", "data-down") == "0"
        # collapsed: the counts are in view, the 50 rows are not, and the form sits right below
        assert page.evaluate("document.querySelector('#clients-details').open") is False
        assert not page.is_visible('#clients tbody tr[data-url$="/clients/1"]')
        federation_box = page.locator("#federation").bounding_box()
        assert federation_box["height"] < 200, federation_box
        assert page.locator("#start-form").bounding_box()["y"] < 400
        # opened and filtered: sim_1 and sim_10 … sim_19
        page.click("#clients-details summary")
        page.fill("#clients-filter", "sim_1")
        page.wait_for_function("document.querySelector('#clients-shown').textContent !== ''")
        shown = [r.locator('[data-field="client_id"]').inner_text() for r in page.locator("#clients tbody tr").all()
                 if r.is_visible()]
        assert sorted(shown) == sorted(["sim_1", *(f"sim_{k}" for k in range(10, 20))])
        assert text(page, "#clients-shown") == f"11 of {K} shown"
        # each row links to that client's own page
        row = page.locator(f'#clients tbody tr[data-url="{urls[11]}"]')
        assert row.locator('[data-field="page"]').get_attribute("href") == urls[11] + "/"
        page.fill("#clients-filter", "")
        page.wait_for_function("document.querySelector('#clients-shown').textContent === ''")
        assert sum(r.is_visible() for r in page.locator("#clients tbody tr").all()) == K
    finally:
        context.close()


def test_a_few_clients_are_listed_open_with_links_to_their_pages(page: Page, apps):
    assert page.evaluate("document.querySelector('#clients-details').open") is True
    for row in page.locator("#clients tbody tr").all():
        assert row.locator('[data-field="page"]').get_attribute("href") == row.get_attribute("data-url") + "/"


def test_a_run_longer_than_a_page_of_rounds_is_shown_whole(local_page: Page, local):
    """GET /runs/<id> answers 1000 rounds a page; the page reads them all."""
    url = local
    status, run = launcher.post_json(url + "/start", {"rounds": 1003, "seed": 5})
    assert status == 200 and run["status"] == "completed"
    local_page.reload()
    local_page.select_option("#run-select", str(run["run_id"]))
    local_page.wait_for_function("document.querySelectorAll('#rounds tbody tr').length === 1003", timeout=30_000)
    assert text(local_page, "#progress-text") == "1003 / 1003 rounds"


def test_a_suspicious_update_is_flagged_on_the_page(browser: Browser, servers, serve):
    """One client always sends w = b = 500: the round's math panel lists it
    with its update norm and ratio, as the API has them."""
    from flask import Flask

    outlier = Flask("outlier")

    @outlier.get("/health")
    def health():
        return {"status": "ok", "client_id": "outlier", "data_size": 2, "num_features": 1}

    @outlier.post("/train")
    def train():
        return {"local_model": {"w": 500.0, "b": 500.0}, "data_size": 2, "client_id": "outlier"}

    client_1 = create_client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(ROOT / "client_1" / "data.csv"),
                                  "TOKEN": None})
    server = servers({"http://127.0.0.1:5001": client_1, "http://127.0.0.1:5002": outlier})
    run = server.run(rounds=1, seed=1)
    flagged = run["rounds"][0]["suspicious"]
    assert [x["client_id"] for x in flagged] == ["outlier"]
    tab = browser.new_context().new_page()
    tab.goto(serve(server.app).url + "/")
    tab.wait_for_selector("#suspicious li")
    item = tab.locator("#suspicious li").inner_text()
    assert item.startswith("outlier: its update's norm " + fmt(flagged[0]["update_norm"]))
    assert f" is {flagged[0]['ratio']:.3g}× the others' median" in item  # (a ratio of hundreds)
    tab.context.close()


def test_rounds_lost_to_timeouts_show_as_a_banner(browser: Browser, servers, serve):
    """A client that always stops at its deadline (408): every round loses a
    half of its sample to timeouts, and the page says so above the run, in
    the words of the run's ``timeouts``; a run without any shows no banner."""
    from flask import Flask

    late = Flask("late")
    late.add_url_rule("/health", "health", lambda: ({"error": "no health here"}, 404))
    late.add_url_rule("/train", "train", lambda: ({"error": "the server's deadline passed: training stopped"}, 408),
                      methods=["POST"])
    client_1 = create_client_app({"CLIENT_ID": "client_1", "DATA_PATH": str(ROOT / "client_1" / "data.csv"),
                                  "TOKEN": None})
    server = servers({"http://127.0.0.1:5001": client_1, "http://127.0.0.1:5002": late})
    run = server.run(rounds=2, seed=1)
    assert run["status"] == "completed" and run["timeouts"]["rounds"] == 2
    tab = browser.new_context().new_page()
    tab.goto(serve(server.app).url + "/")
    tab.wait_for_selector("#run-timeouts:visible")
    assert tab.locator("#run-timeouts").inner_text() == f"Timeouts: {run['timeouts']['message']}."
    tab.context.close()
    plain = servers({"http://127.0.0.1:5001": client_1})
    plain.run(rounds=1, seed=1)
    tab = browser.new_context().new_page()
    tab.goto(serve(plain.app).url + "/")
    tab.wait_for_selector("#run-status[data-status=completed]")
    assert tab.locator("#run-timeouts").is_hidden()
    tab.context.close()


# --- privacy: a secure round shows only the sum; a DP run shows ε against its budget ------

def test_a_secure_round_shows_no_clients_numbers_and_its_unmasking(local_page: Page, local):
    url = local
    run = start_run(url, {"rounds": 2, "secagg": True})
    local_page.reload()
    show_round(local_page, run["run_id"], 2)
    record = run["rounds"][1]
    assert local_page.locator("#average-lines").inner_text().strip() == "\n".join(record["math"])
    assert "Σ y_i" in local_page.locator("#average-lines").inner_text()
    for p in record["participants"]:
        row = local_page.locator(f'#terms tbody tr[data-client="{p["client_id"]}"]')
        assert row.locator('[data-field="n_k"]').inner_text() == "masked"
        assert row.locator('[data-field="w"]').inner_text() == "–"
    assert "Secure aggregation" in local_page.locator("#terms caption").inner_text()


def test_a_dp_run_shows_epsilon_spent_against_its_budget(local_page: Page, local):
    url = local
    run = start_run(url, {"rounds": 3, "dp": {"noise_multiplier": 2.0, "clip": 1.0, "target_epsilon": 50}})
    local_page.reload()
    show_round(local_page, run["run_id"], 3)
    spent = run["rounds"][-1]["privacy"]["epsilon"]
    assert local_page.is_visible("#privacy")
    assert local_page.locator("#privacy-text").inner_text().startswith(f"ε = {spent:.4f} of the budget 50")
    assert float(local_page.get_attribute("#privacy-meter", "value")) == pytest.approx(spent, rel=1e-6)
    assert float(local_page.get_attribute("#privacy-meter", "max")) == 50


# --- a round of more than 100 clients: counted, grouped, its rows a CSV ---------------------

def test_a_large_round_shows_its_summary_and_links_its_csv_without_a_row_per_client(browser: Browser, servers,
                                                                                   serve):
    """150 quantity-skew clients on one host and 150 on a host lost after
    /health: the round shows the API's counts, its groups of n_k, its largest
    weights and its drops by reason, no table of 150 rows, and a link to the
    CSV of all 300."""
    from test_large_rounds import HOST, OTHER, HostLost

    from fedavg.http.host_app import create_host_app
    from fedavg_server.records import SUMMARY_ABOVE

    k = SUMMARY_ABOVE + 50
    host, lost = create_host_app(make_clients("quantity-skew", k, 8)), create_host_app(make_clients("iid", k, 9))
    server = servers(HostLost({**{f"{HOST}/clients/{i}": host for i in range(1, k + 1)},
                               **{f"{OTHER}/clients/{i}": lost for i in range(1, k + 1)}}))
    run = server.run(rounds=2, seed=4)
    assert run["status"] == "completed", run["error"]
    record = run["rounds"][1]
    s = record["summary"]
    url = serve(server.app).url
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        tab = context.new_page()
        tab.set_default_timeout(15_000)
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(url + "/")
        show_round(tab, run["run_id"], 2)
        tab.wait_for_selector("#summary-counts")
        assert text(tab, '#summary-counts [data-field="counts"]') == \
            f"{2 * k} clients sampled: {k} contributed (N = {record['N']}), {k} dropped."
        assert tab.locator("#math tr").count() < 30 and tab.locator("#terms").count() == 0
        href = tab.get_attribute("#clients-csv", "href")
        assert href == f"/runs/{run['run_id']}/rounds/2/clients.csv"
        assert len(get_text(url + href).splitlines()) == 1 + 2 * k
        groups = s["groups"]["groups"]
        assert [text(tab, f'#groups tbody tr[data-group="{g["n_k_from"]}"] [data-field="N_g"]') for g in groups] \
            == [str(g["N"]) for g in groups]
        assert text(tab, '#groups tfoot [data-field="mean_w"]') == fmt(s["groups"]["mean"]["w"])
        assert [r.get_attribute("data-client") for r in tab.locator("#top tbody tr").all()] == \
            [p["client_id"] for p in s["top"]]
        assert text(tab, '#dropped-by-reason [data-field="clients"]') == str(k)
        assert text(tab, '#dropped-by-reason [data-field="reason"]') == s["dropped_by_reason"][0]["reason"]
        assert text(tab, "#dropped-first").endswith(f"and {k - len(record['dropped'])} more (in the CSV).")
        row = tab.locator("#rounds tbody tr").nth(1).locator("td")
        assert [row.nth(j).inner_text() for j in (1, 2)] == [str(k), str(k)]  # contributed, dropped
        assert errors == []
    finally:
        context.close()


def test_a_hosted_population_is_one_row_of_its_clients(browser: Browser, servers, serve):
    """3,000 clients on two shard hosts: the clients table has a row per host (not 3,000), and the
    count above it is of clients, N of their samples (each host's /population)."""
    from test_hosted import SHARDED, Watching

    from fedavg.http.host_app import create_host_app
    from fedavg.population import Population

    whole = Population.build("quantity-skew", 3000, seed=2)
    hosts = {url: create_host_app(None, population=whole.shard(i, 2)) for i, url in enumerate(SHARDED[:2], 1)}
    url = serve(servers(Watching.populations(hosts)).app).url
    for tab in open_tab(browser, url):
        tab.wait_for_function("document.querySelector('#clients-summary').dataset.up !== undefined")
        assert text(tab, "#clients-summary") == f"3000 of 3000 client(s) up; N = {int(whole.sizes.sum())} samples " \
                                                "among those that are up."
        assert tab.locator("#clients tbody tr").count() == 2
        assert text(tab, f'#clients tbody tr[data-url="{SHARDED[1]}/clients/1..1500"] [data-field="client_id"]') == \
            "1,500 clients (a population: sim_1501 … sim_3000)"
