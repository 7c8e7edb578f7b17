"""A replica process's startup with the compile cache, on CPU: run as a script by tests/test_compile_cache.py.

Speed modes are forced on (compiled blocks, no attention backend, no LoRA slot) as on a GPU, the
startup goes through ``startup.build_generator`` (load, compile cache load, warm-up, save), and the
script prints one JSON line: the startup account and inductor's cache counters.

    python tests/compile_cache_scenario.py --model-cache DIR --location DIR --inductor-dir DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-cache", required=True)
    p.add_argument("--location", required=True)
    p.add_argument("--inductor-dir", required=True)
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from torch._dynamo.utils import counters

    from deployments.config import GpuConfig
    from deployments.engine import pipeline as pipeline_mod
    from deployments.replica.startup import build_generator
    from deployments.speed import exact as speed_mod

    pipeline_mod.apply_speed_modes = lambda pipe, speed, device: speed_mod._apply(pipe, speed)
    cfg = GpuConfig.model_validate({
        "model": {"source": "tiny", "device": "cpu", "cache_dir": a.model_cache,
                  "speed": {"attention_backend": None, "lora_hotswap_rank": 0, "warmup_width": 64,
                            "warmup_height": 48, "warmup_frames": 5}},
        "compile_cache": {"location": a.location, "inductor_dir": a.inductor_dir},
    })
    _, generator, report = build_generator(cfg)
    print(json.dumps({"startup": report, "inductor": dict(counters["inductor"]),
                      "graphs": int(counters["stats"]["unique_graphs"])}, default=str))


if __name__ == "__main__":
    main()
