"""The browser tests' server: its own scratch ComfyUI (tiny checkpoint, subject folder)."""

from __future__ import annotations

import pytest

from tests.comfyui.conftest import checkpoint_file, comfy_ready, prepare_base  # noqa: F401
from tests.comfyui.harness import start_server

from .frontend import browser_skip_reason


@pytest.fixture(scope="session")
def browser_ready(comfy_ready):  # noqa: F811
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory, checkpoint_file, browser_ready):  # noqa: F811
    srv = start_server(prepare_base(tmp_path_factory.mktemp("comfy-ui"), checkpoint_file))
    yield srv
    srv.stop()
