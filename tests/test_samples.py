"""``wan-serve samples`` and the README's first example, run as written against the served app."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
from PIL import Image

from serve_app.cli import main
from serve_app.samples import FIRST_FRAME, LORA_REF

ROOT = Path(__file__).resolve().parents[1]
README_URL = "http://127.0.0.1:8000"


def readme_example(name: str) -> str:
    """The code block after ``<!-- readme-example: NAME -->`` in README.md."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- readme-example: {re.escape(name)} -->\s*```bash\n(.*?)```", readme, flags=re.S)
    assert found, f"README.md has no example {name!r}"
    return found.group(1)


def test_samples_are_the_same_files_every_time_and_the_lora_fits_the_tiny_model(tmp_path, model_cache, capsys):
    from deployments.lora.files import WAN_TO_DIFFUSERS, linear_shapes, read_lora
    from deployments.lora.writer import block_indices, tiny_shapes
    from tests.conftest import load_tiny

    # A model of its own: the session's shared one may carry other tests' adapters (peft layers).
    loaded_model = load_tiny(model_cache)

    assert main(["samples", "--out", str(tmp_path / "a")]) == 0
    assert main(["samples", "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [str(tmp_path / "a" / FIRST_FRAME), str(tmp_path / "a" / "loras" / LORA_REF)]
    for name in (FIRST_FRAME, f"loras/{LORA_REF}"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with Image.open(tmp_path / "a" / FIRST_FRAME) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (832, 480))
    # Shapes from the tiny config alone are the loaded tiny transformer's, and the file passes every
    # check the replica makes before loading (an ai-toolkit file covering every block).
    shapes = linear_shapes(loaded_model.pipe.transformer)
    assert tiny_shapes() == shapes
    lora = read_lora(tmp_path / "a" / "loras" / LORA_REF, shapes, type(loaded_model.pipe))
    assert lora.format == "ai-toolkit"
    assert set(lora.scales) == {f"blocks.{b}.{t}" for b in block_indices(shapes) for t in WAN_TO_DIFFUSERS.values()}


def test_samples_leave_a_different_file_alone_unless_forced(tmp_path, capsys):
    mine = tmp_path / FIRST_FRAME
    mine.write_bytes(b"my own picture")
    assert main(["samples", "--out", str(tmp_path)]) == 0
    assert mine.read_bytes() == b"my own picture"
    assert "left as it is" in capsys.readouterr().err
    assert main(["samples", "--out", str(tmp_path), "--force"]) == 0
    assert mine.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("app", ["sqlite"], indirect=True)  # about the README, not state: one backend
def test_readme_first_example_runs_as_written(app, serve_env, monkeypatch, capsys):
    """The README's small example, run by bash as written, in the directory whose ./loras is the app's
    LoRA root; only the server's address differs. Then the CLI example, on the files it wrote."""
    assert serve_env.lora_root == serve_env.root / "loras"
    script = readme_example("small-curl")
    assert README_URL in script
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # ``wan-serve`` as installed by ``pip install -e .``: this checkout's CLI under this interpreter
    prelude = f'wan-serve() {{ {shlex.quote(sys.executable)} -m serve_app.cli "$@"; }}\nset -e\n'
    run = subprocess.run(["bash", "-c", prelude + script.replace(README_URL, app.base_url)], cwd=serve_env.root,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout.strip().splitlines()[-1])
    assert job["status"] == "queued", job
    status = app.wait(job["request_id"], timeout=300)
    assert status["status"] == "succeeded", status
    result = app.http.get(f"/v1/requests/{job['request_id']}/result").json()
    (video,) = result["outputs"]["videos"]
    assert (video["width"], video["height"], video["num_frames"], video["fps"]) == (256, 144, 17, 8)
    assert LORA_REF in app.replica_stats()["resident_adapters"]

    command = " ".join(readme_example("small-cli").replace("\\\n", " ").split())
    argv = shlex.split(command)
    assert argv[0] == "wan-serve"
    monkeypatch.chdir(serve_env.root)
    assert main([*argv[1:], "--server", app.base_url, "--poll", "0.2"]) == 0
    out = serve_env.root / argv[argv.index("--out") + 1]
    assert str(out.name) in capsys.readouterr().out
    frames = iio.imread(io.BytesIO(out.read_bytes()), index=None, extension=".mp4")
    assert frames.shape == (17, 144, 256, 3)
