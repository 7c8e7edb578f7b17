"""The GPU replica as a Serve deployment: one GPU (``WanI2VReplica``) or N (``ParallelWanI2VReplica``).

Kept apart from both replica classes so that neither module imports the other: ``rank_group`` builds on
``wan_i2v``, and only this module chooses between them.
"""

from __future__ import annotations

from ray import serve

from ..config import GpuConfig
from .wan_i2v import LoraSet, WanI2VReplica


def make_deployment(cfg: GpuConfig):
    """The Serve deployment of the GPU replica, sized and multiplexed from the config.

    Bind it with ``(cfg, cfg.replica.make_generator_factory())`` (``WanI2VReplica``'s arguments).
    """
    r = cfg.replica
    base, placement = WanI2VReplica, {"ray_actor_options": {"num_gpus": r.num_gpus, "num_cpus": r.num_cpus}}
    if cfg.parallel.degree > 1:  # one replica owns N GPUs through N rank processes
        from ..parallel.rank_group import ParallelWanI2VReplica, placement_options

        base, placement = ParallelWanI2VReplica, placement_options(cfg)

    class WanI2V(base):
        @serve.multiplexed(max_num_models_per_replica=r.max_loras_per_replica)
        async def get_lora_set(self, key: str) -> LoraSet:
            return await self.load_lora_set(key)

    autoscaling = None
    if r.max_replicas > r.min_replicas:
        autoscaling = {
            "min_replicas": r.min_replicas,
            "max_replicas": r.max_replicas,
            "initial_replicas": r.initial_replicas if r.initial_replicas is not None else r.min_replicas,
            "target_ongoing_requests": r.target_ongoing_requests,
            "upscale_delay_s": r.upscale_delay_s,
            "downscale_delay_s": r.downscale_delay_s,
        }
    return serve.deployment(
        WanI2V,
        name="WanI2V",
        # One generation at a time, so adapters never change under a running request.
        max_ongoing_requests=1,
        num_replicas=None if autoscaling else r.min_replicas,
        autoscaling_config=autoscaling,
        **placement,
        health_check_period_s=r.health_check_period_s,
        health_check_timeout_s=r.health_check_timeout_s,
        graceful_shutdown_timeout_s=r.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=r.graceful_shutdown_wait_loop_s,
    )
