"""Nodes that share no disk (``tests/cluster_scenario.py``): PostgreSQL and S3 are the only shared state;
two ingress replicas on two nodes, one SIGKILLed mid-run; every job ends exactly once and downloads
through either replica. The scenario builds its own multi-node Ray cluster, so it runs in a subprocess."""

from __future__ import annotations

import pytest

from tests.scenarios import run_scenario

pytestmark = [pytest.mark.full, pytest.mark.cluster, pytest.mark.postgres]


def test_fifty_jobs_exactly_once_across_nodes_that_share_no_disk(pg_server, s3_server, tmp_path):
    v, context, returncode = run_scenario(
        "cluster_scenario.py", ["--pg-url", pg_server.create_db(), "--s3-endpoint", s3_server.endpoint,
                                "--bucket", s3_server.bucket, "--workdir", str(tmp_path), "--jobs", "50",
                                # 2 slow steps a job, not the script's 4: the ingress is still killed with
                                # jobs in flight (4 retried in a run), and the 50 jobs end 7 s sooner
                                "--steps", "2"], timeout=600)
    assert "error" not in v, context
    assert (v["nodes"], v["ingress_nodes"], v["gpu_nodes"]) == (5, 2, 2), context
    assert v["submitted"] == 50 and v["statuses"] == {"succeeded": 50, "failed": 0, "canceled": 0}, context
    assert v["db_rows"] == 50 and v["one_row_per_job"] and v["made_once"], context
    assert v["downloaded_via_both"] == 50 and v["download_mismatches"] == 0, context
    assert v["state_files_on_nodes"] == [] and v["gpu_nodes_built_their_own_checkpoint"], context
    assert v["ok"] and returncode == 0, context
