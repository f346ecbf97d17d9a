"""The ComfyUI frontend in headless Chromium (system /usr/bin/chromium, Playwright for Python)."""

from __future__ import annotations

import contextlib
import os
import urllib.request

CHROMIUM = os.environ.get("LORA2_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
READY = ("() => window.app?.graph && window.LiteGraph?.registered_node_types && "
         "Object.keys(window.LiteGraph.registered_node_types).length > 100")


def browser_skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed for this python (pip install playwright)"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (set LORA2_CHROMIUM)"
    return None


@contextlib.contextmanager
def open_frontend(server, viewport=(1600, 1000)):
    """A page with the ComfyUI app loaded and the first-run tutorial marked as done."""
    from playwright.sync_api import sync_playwright

    req = urllib.request.Request(server.url + "/settings/Comfy.TutorialCompleted", data=b"true",
                                 method="POST")
    urllib.request.urlopen(req, timeout=30).read()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.console_messages = []
            page.on("console", lambda m: page.console_messages.append(f"{m.type}: {m.text}"))
            page.goto(server.url)
            try:
                page.wait_for_function(READY, timeout=180_000)
            except Exception as exc:
                log = "\n".join(page.console_messages[-25:])
                raise RuntimeError(f"the ComfyUI frontend did not load: {exc}\n{log}") from None
            yield page
        finally:
            browser.close()
