"""The web as an attacker: a page on another origin that makes the user's
browser post to the server (cross-site request forgery), and a name the
attacker's DNS points at 127.0.0.1 (DNS rebinding)."""
from __future__ import annotations

import pytest
from flask import Flask

import launcher
from fedavg.scenarios import make_clients


@pytest.fixture
def server_client(federation):
    # The seed's clients in this process: the requests that pass the checks
    # start a run that completes, in milliseconds.
    return federation(make_clients("seed", 2), ALLOWED_HOSTS=["fedavg.lan"]).http


def runs_of(client) -> list:
    return client.get("/runs").get_json()["runs"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_body_a_web_page_can_send_without_asking_is_refused(server_client, content_type):
    r = server_client.post("/start", data='{"rounds": 100000, "pace_s": 60}', content_type=content_type)
    assert r.status_code == 415, r.get_data(as_text=True)
    assert runs_of(server_client) == []


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:1", "https://localhost"])
def test_another_origin_is_refused_even_without_a_body(server_client, origin):
    r = server_client.post("/start", headers={"Origin": origin})
    assert r.status_code == 403 and "cross-site request" in r.get_json()["error"]
    assert runs_of(server_client) == []


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5000", "localhost.evil.example"])
def test_a_host_name_the_server_does_not_know_is_refused(server_client, host):
    """DNS rebinding: the attacker's name resolves to 127.0.0.1, and the browser
    sends that name as Host."""
    r = server_client.get("/runs", headers={"Host": host})
    assert r.status_code == 403 and "unknown Host" in r.get_json()["error"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:5000", "[::1]:5000", "10.1.2.3", "fedavg.lan:5000"])
def test_addresses_localhost_and_allowed_names_are_served(server_client, host):
    assert server_client.get("/runs", headers={"Host": host}).status_code == 200


def test_the_pages_own_origin_and_the_seeds_bodiless_curl_pass(server_client):
    r = server_client.post("/start", json={"rounds": 1, "wait": False, "client_timeout_s": 0.2},
                           headers={"Origin": "http://localhost"})
    assert r.status_code == 202
    server_client.application.extensions["fedavg"].wait(r.get_json()["run_id"])
    r = server_client.post("/start")  # curl -X POST …/start: no body, no Origin
    assert r.status_code == 200


def evil_site(target: str) -> Flask:
    """A page on another origin that tries three ways to start a run on the
    user's server: a no-cors fetch with a text/plain JSON body, one with no
    body, and a form posted to a hidden frame. Its title becomes "sent" once
    the server has answered all three."""
    app = Flask("evil")

    @app.get("/")
    def page():
        return f"""<!doctype html><title>win a prize</title>
<iframe name="sink" style="display:none"></iframe>
<form id="f" method="post" action="{target}/start" target="sink" enctype="text/plain">
  <input name='{{"rounds": 100000, "pace_s": 60, "x": "' value='"}}'>
</form>
<script>
(async () => {{
  const body = JSON.stringify({{rounds: 100000, pace_s: 60}});
  await fetch("{target}/start", {{method: "POST", mode: "no-cors", body}}).catch(() => {{}});
  await fetch("{target}/start", {{method: "POST", mode: "no-cors"}}).catch(() => {{}});
  // the frame loads the server's answer to the form: then all three are answered
  document.querySelector("iframe").addEventListener("load", () => {{ document.title = "sent"; }}, {{once: true}});
  document.getElementById("f").submit();
}})();
</script>"""

    return app


@pytest.mark.system
def test_a_forged_request_from_another_page_starts_nothing_and_the_form_still_works(browser, tmp_path, serve):
    apps = launcher.start_federation({name: launcher.free_port() for name in launcher.DEFAULT_PORTS},
                                     server_args=["--db", str(tmp_path / "runs.db")])
    try:
        server = apps["server"].url
        evil = serve(evil_site(server)).url
        context = browser.new_context()
        tab = context.new_page()
        tab.goto(evil)
        tab.wait_for_function("document.title === 'sent'", timeout=15_000)
        # Each request is answered: a /start the server took would be in its
        # history by now (a run is recorded before /start answers, and a
        # forged 100000-round run would have kept its request from being answered).
        assert launcher.get_json(server + "/runs")["runs"] == [], "a forged request started a run"
        assert "Run 1" not in apps["server"].output()
        # the server's own page, in the same browser, still starts a run
        tab.goto(server + "/")
        tab.fill("#f-rounds", "2")
        tab.click("#start-button")
        tab.wait_for_function("document.querySelector('#run-status').dataset.status === 'completed'",
                              timeout=30_000)
        assert [r["status"] for r in launcher.get_json(server + "/runs")["runs"]] == ["completed"]
        context.close()
    finally:
        launcher.stop(list(apps.values()))
