"""``build_app(args)``: validate the one ``AppConfig`` and wire the ingress to the GPU replicas."""

from __future__ import annotations

from ray.serve import Application

from deployments.contract import make_deployment

from .config import AppConfig
from .ingress import Ingress


def build_app(args: dict | None = None) -> Application:
    """The Serve application for ``serve run``/``serve deploy`` (``import_path: serve_app.app:build_app``).

    Args:
        args: the YAML's ``args:``, validated into ``AppConfig`` once, here.
    """
    cfg = AppConfig.model_validate(args or {})
    replica = make_deployment(cfg.gpu).bind(cfg.gpu, cfg.gpu.replica.make_generator_factory())
    ingress = Ingress.options(
        num_replicas=cfg.ingress.num_replicas,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
        max_replicas_per_node=cfg.ingress.max_replicas_per_node,
        graceful_shutdown_wait_loop_s=cfg.ingress.graceful_shutdown_wait_loop_s,
    )
    return ingress.bind(cfg.model_dump(mode="json"), replica)
