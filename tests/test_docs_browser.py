"""/docs in a real headless browser with no internet: authorise, submit, read the 202.

Debian's Chromium and ChromeDriver (``apt-get install chromium chromium-driver``) drive
the page. Every host name but the API's fails to resolve, so a page that needed a CDN
would stay blank. Without Chromium on the machine the test says so and is skipped.
"""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from tests.conftest import ROW, Stack, wait_for

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,2000",
        # No internet: every name but loopback's fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def test_docs_authorise_and_submit_from_the_page(stack: Stack, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def find(css: str, within=None):  # type: ignore[no-untyped-def]
        root = within or browser
        return wait_for(lambda: root.find_elements(By.CSS_SELECTOR, css), 20, css)[0]

    key = os.environ["INFERQ_BOOTSTRAP_API_KEY"]  # what inferq up prints as api_key
    browser.get(stack.api_url + "/docs")
    assert "inferq" in find(".swagger-ui .info .title").text

    find("button.authorize").click()
    find(".auth-container input").send_keys(key)
    find(".auth-btn-wrapper button.authorize").click()
    find(".auth-btn-wrapper button.btn-done").click()

    submit = next(
        block
        for block in browser.find_elements(By.CSS_SELECTOR, ".opblock-post")
        if block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").text.strip() == "/v1/jobs"
    )
    submit.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    find("button.try-out__btn", submit).click()
    body = find("textarea.body-param__text", submit)
    body.send_keys(Keys.CONTROL, "a")
    body.send_keys(Keys.DELETE)
    body.send_keys(json.dumps({"model": "churn", "inputs": [ROW]}))
    find("button.execute", submit).click()

    def shown_status() -> bool:
        cells = submit.find_elements(By.CSS_SELECTOR, ".live-responses-table .response-col_status")
        return any(c.text.strip() == "202" for c in cells)

    try:
        wait_for(shown_status, 20, "the 202 on the page")
    except AssertionError:
        raise AssertionError(f"the page shows:\n{submit.text[:3000]}") from None
    answer = json.loads(find(".live-responses-table .response-col_description pre", submit).text)
    assert answer["status"] == "queued" and answer["model"] == "churn"
    # The page sent the key: the job is the admin tenant's, and it runs.
    job = httpx.get(
        f"{stack.api_url}/v1/jobs/{answer['id']}",
        params={"wait": 20},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ).json()
    assert job["status"] == "succeeded", job
