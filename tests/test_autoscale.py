"""Autoscaling across (simulated) nodes: 1 -> several GPU replicas under a burst, sticky LoRA routing,
back to one when idle, and a node drained mid-job. The scenario builds its own multi-node Ray
cluster, so it runs in a subprocess (``tests/autoscale_scenario.py``), never beside the session's
cluster in this process.
"""

from __future__ import annotations

import pytest

from tests.scenarios import run_scenario

pytestmark = [pytest.mark.full, pytest.mark.cluster]


def test_scale_out_across_nodes_sticky_loras_and_scale_in(model_cache, tmp_path):
    v, context, returncode = run_scenario(
        "autoscale_scenario.py", ["--model-cache", str(model_cache), "--workdir", str(tmp_path), "--workers", "3",
                                  "--jobs", "10", "--steps", "12", "--downscale-delay-s", "8"], timeout=300)
    assert "error" not in v, context
    assert (v["nodes"], v["gpu_nodes"], v["replicas_at_start"]) == (4, 3, 1), context

    burst = v["burst"]
    assert burst["succeeded"] == burst["jobs"] == 10, context
    assert burst["peak_running_replicas"] >= 2 and burst["peak_nodes_with_replicas"] >= 2, context
    assert burst["distinct_replicas_serving"] >= 2, context  # the new replicas took jobs

    lora = v["lora"]
    assert max(lora["running_replicas_during"]) >= 2, context  # there was a choice to make
    assert lora["same_replica"], context  # every repeat went to the replica holding the set
    assert lora["holder_adapter_loads"] == 1, context  # ... which loaded it once
    assert sum(lora["adapter_loads_by_replica"].values()) == 1, context

    assert v["scale_down"]["replicas_after_idle"] == 1, context
    assert v["after_scale_down_job"] == "succeeded", context

    drain = v["drain"]  # the last replica's node drained mid-job: moved, and the job finished there
    assert drain["moved"] and drain["next_job"] == "succeeded", context
    assert drain["job"] == "succeeded" and drain["attempts"] == 1 and drain["job_made_by_old_replica"], context
    assert v["ok"] and returncode == 0, context
