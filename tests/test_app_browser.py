"""The app served by `saebench app`, driven in real headless Chromium: every page renders without
an exception, shows the library's numbers, and the server listens on 127.0.0.1 only.

Screenshots of each page are kept as test artifacts in test-artifacts/ (or SAEBENCH_SCREENSHOTS=DIR)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from test_analysis import make_run

import saebench as sb
from saebench.analysis import AnalysisConfig

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("SAEBENCH_SCREENSHOTS") or Path(__file__).resolve().parents[1] / "test-artifacts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


def serve_app(runs: list[Path], port: int) -> tuple[subprocess.Popen, str]:
    """`saebench app RUNS --port PORT` in a subprocess, once its health endpoint answers -> (process, base URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "saebench.cli", "app", *map(str, runs), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start: {proc.stdout.read()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    run, _ = make_run(root, name="browsed")
    sb.analyze(
        run,
        AnalysisConfig(n_tokens=1500, n_examples=5, n_samples=12, n_intervals=4, per_interval=2),
        show_progress=False,
    )
    port = free_port()
    proc, url = serve_app([run], port)
    yield url, port, run
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMEDRIVER) and shutil.which("chromium")):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--window-size=1400,1800",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def open_page(driver, url: str, expect: str, shot: str, timeout: float = 90) -> str:
    """Load url, wait until the page shows `expect` and streamlit has stopped running; -> page text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: expect in d.find_element(By.TAG_NAME, "body").text)
    WebDriverWait(driver, timeout).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
    )
    # widgets' code loads lazily: placeholders stand in until it has
    WebDriverWait(driver, timeout).until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid*="keleton"]'))
    time.sleep(1.0)  # plotly draws after the script ends
    exceptions = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert not exceptions, exceptions[0].text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"app-{shot}.png"))
    return driver.find_element(By.TAG_NAME, "body").text


def test_the_server_listens_on_loopback_only(server):
    _, port, _ = server
    addrs = listening_addresses(port)
    assert addrs and all(a in ("0100007F", "00000000000000000000000001000000") for a in addrs), addrs


def test_every_page_renders_in_chromium(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, run = server
    store = sb.FeatureStore(run)
    card = store.feature(4)

    text = open_page(browser, f"{url}/", "saebench · browsed", "home")
    assert "No evaluation yet" in text and "128 of 128 features" in text

    text = open_page(browser, f"{url}/Feature?run=0&feature=4", "Feature 4", "feature")
    assert f"{card.top_examples[0].value:.3f}" in text
    spans = browser.find_elements(By.CSS_SELECTOR, "span[title]")
    titles = {s.get_attribute("title") for s in spans}
    top = card.top_examples[0].value  # on hover, as the store keeps example codes: float16
    assert any(
        abs(float(t) - top) <= 1e-3 * abs(top) for t in titles if t.replace(".", "").replace("-", "").isdigit()
    ), (top, titles)
    assert browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")  # the histogram is drawn
    assert browser.find_elements(By.CSS_SELECTOR, 'input[aria-label="label"]')  # the label editor
    neighbour = card.decoder_neighbours[0][0]
    link = browser.find_element(By.CSS_SELECTOR, f'a[href$="feature={neighbour}"]')
    link.click()
    WebDriverWait(browser, 60).until(lambda d: f"Feature {neighbour}" in d.find_element(By.TAG_NAME, "h1").text)
    assert f"feature={neighbour}" in browser.current_url

    text = open_page(
        browser, f"{url}/Prompt?run=0&prompt={quote('And God said, Let there be light')}", "All features on", "prompt"
    )
    assert "light" in text

    text = open_page(
        browser,
        f"{url}/Steer?run=0&features=4:{card.max_activation:.3g}&tokens=12&prompt={quote('In the beginning')}",
        "perplexity under the unsteered model",
        "steer",
    )
    assert "default" in text and "steered" in text
    texts = [
        e
        for e in browser.find_elements(By.CSS_SELECTOR, "div")
        if e.find_elements(By.XPATH, './span[starts-with(@title, "log p = ")]')
    ]
    assert len(texts) == 2  # the default and the steered continuation
    assert all(len(t.find_elements(By.XPATH, './span[starts-with(@title, "log p = ")]')) == 12 for t in texts)

    text = open_page(
        browser,
        f"{url}/Trace?run=0&layer=1&head=2&prompt={quote('The cat sat on the mat. The cat sat on the mat.')}",
        "pre-softmax score",
        "trace",
    )
    assert "Top QK pairs" in text and len(browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3
