"""Compiled kernels reused across processes: the first replica saves torch's compile cache artifacts to
the configured location, a fresh process (empty inductor cache of its own) loads them and compiles
from cache hits. Real torch.compile of the tiny transformer on CPU, through ``startup.build_generator``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("compile_cache_scenario.py")


def _start(model_cache, location: Path, inductor_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    proc = subprocess.run([sys.executable, str(SCENARIO), "--model-cache", str(model_cache), "--location",
                           str(location), "--inductor-dir", str(inductor_dir)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cache_key_covers_what_compiled_code_depends_on():
    from deployments.speed.compile_cache import cache_key

    base = dict(transformer_config={"num_layers": 40, "_diffusers_version": "x"}, dtype="torch.bfloat16",
                speed={"compile_blocks": True}, parallel=None)
    key = cache_key(**base)
    assert key == cache_key(**base) and key.endswith("-rank0")
    assert cache_key(**{**base, "transformer_config": {"num_layers": 40, "_diffusers_version": "y"}}) == key
    for change in ({"dtype": "torch.float16"}, {"speed": {"compile_blocks": False}},
                   {"transformer_config": {"num_layers": 2}}, {"parallel": {"degree": 2}}):
        assert cache_key(**{**base, **change}) != key, change
    assert cache_key(**base, rank=1) != key


@pytest.mark.full
@pytest.mark.compile
def test_a_fresh_process_compiles_from_the_saved_artifacts(model_cache, tmp_path):
    location = tmp_path / "compile-cache"
    first = _start(model_cache, location, tmp_path / "inductor-1")
    cache = first["startup"]["compile_cache"]
    assert cache["enabled"] and cache["hit"] is False and cache["saved"] and cache["bytes"] > 0, first
    assert first["inductor"].get("fxgraph_cache_miss", 0) > 0 and first["graphs"] > 0
    assert list(location.iterdir()) == [location / f"{cache['key']}.bin"]

    second = _start(model_cache, location, tmp_path / "inductor-2")  # nothing in its own inductor cache
    cache2 = second["startup"]["compile_cache"]
    assert cache2["key"] == cache["key"] and cache2["hit"] is True and "saved" not in cache2, second
    assert second["inductor"].get("fxgraph_cache_hit", 0) > 0 and second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["startup"]["warmup_s"] > 0 and second["graphs"] == first["graphs"]
