"""The playground page (serve_app/playground.py, serve_app/static/) driven in a real browser.

Debian's chromium through Playwright's Python package (never Playwright's own browser download),
against the real app on the tiny checkpoint, with API keys: the key field, the form, progress, the
video played from a blob: URL and downloaded. Chromium missing is a failure, never a skip.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from tests.conftest import make_image, png_bytes

pytestmark = [pytest.mark.full, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "playground-key-0123456789abcdef"
OTHER_KEY = "playground-other-key-0123456789"
MAX_LORAS = 2
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def keyed(serve_env):
    """The app with API keys and at most two LoRAs, under its own route prefix."""
    from ray import serve

    args = serve_env.args_for("playground", auth={"api_keys": [KEY, OTHER_KEY]}, limits={"max_loras": MAX_LORAS})
    app = serve_env.deploy("playground", "/playground", args)
    yield app
    serve.delete("playground")


@pytest.fixture(scope="module")
def lora(serve_env) -> str:
    """A small valid LoRA in the shared LoRA root; returns its root-relative path."""
    from deployments.engine.models import TINY_TRANSFORMER_CONFIG as T
    from tests.lora_factory import make_lora

    d = serve_env.lora_root / "playground"
    d.mkdir(exist_ok=True)
    dim = T["num_attention_heads"] * T["attention_head_dim"]
    make_lora(d / "style.safetensors", "ai-toolkit", {"blocks.0.attn1.to_q": (dim, dim)}, blocks=[0],
              targets=["self_attn.q"])
    return "playground/style.safetensors"


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True)
    p = context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    p.problems = []  # uncaught script errors and Content-Security-Policy refusals
    p.on("pageerror", lambda e: p.problems.append(f"pageerror: {e}"))
    p.on("console", lambda m: p.problems.append(m.text) if "Content Security Policy" in m.text else None)
    yield p
    context.close()


def text(page, selector: str) -> str:
    return page.locator(selector).text_content() or ""


def test_generate_watch_play_and_download_with_a_key(keyed, lora, page, tmp_path):
    frames, fps = 9, 8
    first_frame = tmp_path / "first.png"
    image = make_image(64, 48, seed=3)
    first_frame.write_bytes(png_bytes(image))

    # The page itself needs no key; the API does, and the page says so.
    page.goto(keyed.base_url)  # no trailing slash: the page's <base> still points its requests here
    expect(page.locator("#key-status")).to_have_text("this server needs an API key")
    expect(page.locator("#recent-error")).to_have_text("enter the API key to see its jobs")
    expect(page.locator("#submit")).to_be_disabled()

    page.fill("#api-key", KEY)
    page.click("#key-save")
    expect(page.locator("#submit")).to_be_enabled()
    assert page.evaluate("() => sessionStorage.getItem('wan-i2v-api-key')") == KEY
    # This server runs exact and fast (turbo needs its LoRA file): the field offers what /v1/models lists.
    assert page.locator("#speed-label").is_visible() and page.input_value("#speed") == "exact"
    assert page.locator("#speed option").all_inner_texts() == ["exact", "fast"]
    assert page.locator("#width").get_attribute("placeholder") == "832"  # the server's defaults, from /v1/models

    # LoRA rows up to the server's max_loras, then the button stops adding.
    for _ in range(MAX_LORAS):
        page.click("#lora-add")
    assert page.locator("#lora-add").is_disabled() and page.locator("#loras .lora").count() == MAX_LORAS
    page.locator("#loras .lora button").nth(1).click()
    assert not page.locator("#lora-add").is_disabled()
    page.fill("#loras .lora-path", lora)
    page.fill("#loras .lora-scale", "0.8")

    page.set_input_files("#image-file", str(first_frame))
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#neg", "blurry")
    for selector, value in (("#width", "64"), ("#height", "48"), ("#num-frames", str(frames)), ("#fps", str(fps)),
                            ("#steps", "2"), ("#seed", "7")):
        page.fill(selector, value)
    page.select_option("#sampler", "flowmatch_euler")
    # Every stage the page shows, as it shows it: the event stream brings each, however short.
    page.evaluate("""() => { window.stagesShown = []; const el = document.getElementById('job-stage');
        new MutationObserver(() => { const t = el.textContent;
            if (t && window.stagesShown.at(-1) !== t) window.stagesShown.push(t); })
          .observe(el, {childList: true, characterData: true, subtree: true}); }""")
    page.click("#submit")

    expect(page.locator("#job-id")).not_to_be_empty()
    rid = text(page, "#job-id")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(page.locator("#job-step")).to_have_text("step 2/2")
    assert text(page, "#form-error") == ""
    assert page.evaluate("() => window.stagesShown") == [
        "queued", "loading_loras", "encoding_text", "encoding_image", "vae_encoding", "denoising", "vae_decoding",
        "encoding_video", "done"]

    # The job holds what the form said, and the uploaded picture as its first frame.
    (row,) = keyed.db_rows("id=?", (rid,))
    (spec,) = [json.loads(s) for s in json.loads(row["specs"])]
    assert (spec["prompt"], spec["negative_prompt"], spec["width"], spec["height"]) == (
        "a lighthouse at dusk", "blurry", 64, 48)
    assert (spec["num_frames"], spec["fps"], spec["steps"], spec["seed"], spec["sampler"]) == (
        frames, fps, 2, 7, "flowmatch_euler")
    assert spec["loras"] == [{"ref": lora, "multiplier": 0.8}]
    stored = Path(keyed.args["storage"]["outputs_dir"]) / spec["image_key"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.read_bytes()))), np.asarray(image))

    # The video plays from a blob: URL, and its duration is frames / fps.
    page.wait_for_function(
        "() => { const v = document.getElementById('video');"
        " return !v.hidden && v.readyState >= 1 && Number.isFinite(v.duration); }")
    assert page.eval_on_selector("#video", "v => v.src").startswith("blob:")
    duration = page.eval_on_selector("#video", "v => v.duration")
    assert abs(duration - frames / fps) < 0.5 / fps, duration

    # Download: the same bytes as the API serves, a valid video of the requested frames.
    with page.expect_download() as info:
        page.click("#download")
    saved = tmp_path / "download.mp4"
    info.value.save_as(saved)
    served = keyed.http.get(f"/v1/requests/{rid}/outputs/0", headers={"Authorization": f"Bearer {KEY}"})
    assert saved.read_bytes() == served.content
    video = iio.imread(saved, index=None, extension=".mp4")
    assert video.shape == (frames, 48, 64, 3)
    assert info.value.suggested_filename == f"{rid}-0.mp4"

    # Recent jobs of this key list it; another key's list does not.
    listed = page.locator("#recent-rows code", has_text=rid)
    expect(listed).to_have_count(1)
    page.fill("#api-key", OTHER_KEY)
    page.click("#key-save")
    expect(page.locator("#key-status")).to_have_text("key accepted")
    expect(listed).to_have_count(0)
    assert page.problems == []


def test_speed_field_shows_only_where_the_server_lists_modes(keyed, page):
    """The field follows /v1/models: hidden without speed modes (a server before them), and where it
    lists some, the request carries the chosen mode."""
    def without_modes(route):
        response = route.fetch()  # the real answer, less the fields a server before speed modes lacks
        if not response.ok:  # no key yet: 401 as is
            return route.fulfill(response=response)
        body = response.json()
        for field in ("speed_modes", "default_speed", "turbo_steps"):
            body["models"][0].pop(field, None)
        route.fulfill(response=response, json=body)

    page.route("**/v1/models", without_modes)
    page.goto(keyed.base_url + "/")
    page.evaluate("key => sessionStorage.setItem('wan-i2v-api-key', key)", KEY)
    page.reload()  # the key from sessionStorage is used at load
    expect(page.locator("#submit")).to_be_enabled()
    assert page.locator("#speed-label").is_hidden()
    page.unroute("**/v1/models")

    sent = []

    def capture(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=503, json={"detail": {"error": {"code": "STORE_UNAVAILABLE", "message": "try later",
                                                             "details": {}}}})

    page.route("**/v1/inference", capture)
    page.reload()
    expect(page.locator("#submit")).to_be_enabled()
    assert page.locator("#speed-label").is_visible() and page.input_value("#speed") == "exact"
    page.select_option("#speed", "fast")
    page.fill("#image-url", "https://example.com/first.png")
    page.fill("#prompt", "p")
    page.click("#submit")
    expect(page.locator("#form-error")).to_have_text("STORE_UNAVAILABLE: try later")
    (request,) = sent
    assert request["speed"] == "fast" and request["prompts"][0]["ctrl_img"] == "https://example.com/first.png"
    assert request["loras"] == [] and "width" not in request["prompts"][0]  # empty fields: the server's defaults
    assert page.problems == []


def test_an_installed_package_ships_the_playground(tmp_path):
    """The wheel holds serve_app/static/ (package data), or an installed server would serve 500s at /."""
    from serve_app import playground

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((root / name).read_bytes())
    for package in ("serve_app", "deployments"):
        shutil.copytree(root / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"serve_app/static/{name}" for name in ("playground.html", *playground.ASSETS)}
    assert expected <= names, expected - names
    # and every module, the deployments rooms' subpackages included (package discovery in pyproject.toml)
    modules = {p.relative_to(src).as_posix() for package in ("serve_app", "deployments")
               for p in (src / package).rglob("*.py")}
    assert {"deployments/engine/compat.py", "deployments/lora/refs.py"} <= modules
    assert modules <= names, sorted(modules - names)

