"""The live dashboard: its data for operators only, the registry-wide watch behind it, and
the page itself in a real headless Chromium (Debian's chromium and chromium-driver, driven
by selenium; tests/ensure-chromium.sh installs them once)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from connectplugin import Client, ClientConfig, Code, MetricsConfig, OperatorToken
from connectplugin.gen.connectplugin.v1 import registry_pb2
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from samples.kv.gen.kv.v1 import kv_pb2
from tests.helpers import AVAILABLE, STATE, UNAVAILABLE, Reader, provider_process

TOKEN = "operator-secret-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENSURE = Path(__file__).with_name("ensure-chromium.sh")


@pytest.fixture
def observed(make_host):
    """A host keeping metrics, observable with ``TOKEN``, running the provider ``svc``."""
    host = make_host(metrics=MetricsConfig(), operator_tokens=[OperatorToken(TOKEN, name="ops")])
    client = host.launch(provider_process("svc"), name="kv")
    return host, client


def watch_all(client: Client, limit: int) -> Reader:
    request = registry_pb2.WatchServiceRequest(service_type="")
    return Reader(lambda: ServiceRegistryClient(client).watch_service(request), limit)


# --- the data ---------------------------------------------------------------------------------


def test_the_plugins_data_lists_plugins_services_health_and_calls(observed):
    host, client = observed
    client.dispense("kv").get(kv_pb2.GetRequest(key="a"))

    data = requests.get(host.url + "/dashboard/api/plugins", headers=AUTH, timeout=5).json()

    (plugin,) = data["plugins"]
    assert (plugin["name"], plugin["self_id"]) == ("kv", "svc")
    assert plugin["runtime_id"] == host.runtime_id(client)
    assert plugin["health"] == "HEALTHY"
    assert [(s["service_type"], s["version"]) for s in plugin["services"] if s["registered"]] == [("svc", "1.0.0")]
    assert plugin["calls"] == {"router": 0, "host": 1}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer not-the-operator-token"}], ids=["none", "wrong"]
)
def test_a_stranger_gets_no_dashboard_data(observed, headers):
    host, _ = observed

    response = requests.get(host.url + "/dashboard/api/plugins", headers=headers, timeout=5)

    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    assert "svc" not in response.text


def test_an_operator_watches_every_service_type_at_once(observed):
    host, client = observed
    with Client(host.url, ClientConfig(timeout=None, headers=AUTH)) as operator:
        events = watch_all(operator, limit=2)
        first = events.wait_for(1)[0]
        assert (first.service_type, STATE(first.state)) == ("svc", AVAILABLE)
        assert first.endpoint.provider_id == host.runtime_id(client)

        host.stop(client)

        gone = events.wait_for(2)[1]
        assert (gone.service_type, STATE(gone.state)) == ("svc", UNAVAILABLE)
        events.join()


def test_only_operators_watch_every_type(observed, peer):
    host, _ = observed
    plugin = peer(host, "nosy")

    for headers in ({}, plugin.credentials(), {"Authorization": "Bearer not-the-operator-token"}):
        with Client(host.url, ClientConfig(timeout=5, headers=headers)) as stranger:
            events = watch_all(stranger, limit=1)
            events.join()
        assert events.messages == []
        assert events.error is not None and events.error.code is Code.UNAUTHENTICATED


def test_the_page_is_served_with_headers_that_keep_the_token_in_it(observed):
    host, _ = observed

    moved = requests.get(host.url + "/dashboard", allow_redirects=False, timeout=5)
    page = requests.get(host.url + "/dashboard/", timeout=5)

    assert moved.status_code == 308 and moved.headers["Location"] == "dashboard/"  # its URLs are relative
    assert page.status_code == 200 and "svc" not in page.text  # the page itself holds no data
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["X-Frame-Options"] == "DENY"
    assert requests.get(host.url + "/dashboard/nothing-here", timeout=5).status_code == 404


# --- the page, in a real browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver; installed with apt-get on first use."""
    installed = subprocess.run(["sh", str(ENSURE)], capture_output=True, text=True, timeout=900)
    if installed.returncode != 0:
        pytest.skip(f"no headless Chromium: {installed.stderr.strip()}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def text_of(driver, selector: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.CSS_SELECTOR, selector).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def until(driver, check, what: str, timeout: float = 15.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: check(d), message=what)


def test_the_page_shows_a_launched_plugin_and_follows_it_stopping_without_reload(observed, browser):
    host, client = observed
    runtime_id = host.runtime_id(client)

    browser.get(host.url + "/dashboard/#token=" + TOKEN)

    until(browser, lambda d: text_of(d, '#services tr[data-service="svc"] .state') == "available", "svc available")
    assert text_of(browser, '#services tr[data-service="svc"] .provider') == runtime_id
    assert text_of(browser, '#services tr[data-service="svc"] .version') == "1.0.0"
    until(browser, lambda d: text_of(d, '#plugins tr[data-plugin="kv"] .health') == "healthy", "kv healthy")
    assert "svc 1.0.0" in text_of(browser, '#plugins tr[data-plugin="kv"] .services')
    assert "#" not in browser.current_url  # the token left the address bar at once
    browser.execute_script("window.sameDocument = true")

    host.stop(client)

    until(browser, lambda d: text_of(d, '#services tr[data-service="svc"] .state') == "unavailable", "svc unavailable")
    until(browser, lambda d: text_of(d, '#plugins tr[data-plugin="kv"]') == "", "kv gone from the plugins")
    assert browser.execute_script("return window.sameDocument") is True  # no reload


@pytest.mark.parametrize("fragment", ["", "#token=not-the-operator-token"], ids=["no-token", "wrong-token"])
def test_the_page_shows_nothing_without_the_token(observed, browser, fragment):
    host, _ = observed

    browser.get(host.url + "/dashboard/" + fragment)

    if fragment:
        until(browser, lambda d: text_of(d, "#status").startswith("refused: unauthenticated"), "the refusal")
    else:
        until(browser, lambda d: text_of(d, "#status") == "no token", "the sign-in form")
    assert text_of(browser, "#services tbody") == ""
    assert text_of(browser, "#plugins tbody") == ""
    assert "svc" not in browser.page_source
