"""The per-node LoRA cache actor: one ``LoraStore`` per node, shared by every replica on it.

Concurrent resolves of one reference share one download; the actor's name carries a digest of its
configuration, so a redeploy with other fetch rules gets its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from pydantic import SecretStr

from ..config import FetchConfig, LoraCacheConfig, url_scheme
from ..errors import LoraFetchFailed
from .cache import LoraStore
from .refs import FSSPEC_SCHEMES

ACTOR_NAMESPACE = "wan-i2v"


class LoraCacheActor:
    """Async Ray actor around :class:`LoraStore`: one per node; concurrent resolves of one ref share a fetch.

    A plain class, made an actor by :func:`get_or_create_cache_actor` (so importing this module
    does not need Ray, and tests can drive it directly under asyncio).
    """

    def __init__(self, lora_cfg: LoraCacheConfig | dict, fetch_cfg: FetchConfig | dict):
        from ..replica.metrics import LoraCacheMetrics

        self._lora_cfg = LoraCacheConfig.model_validate(lora_cfg)
        self._fetch_cfg = FetchConfig.model_validate(fetch_cfg)
        metrics = LoraCacheMetrics(config_key(self._lora_cfg, self._fetch_cfg))
        self._store = LoraStore(self._lora_cfg, self._fetch_cfg, on_count=metrics.count)
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self._merged = 0

    async def resolve(self, ref: str, hf_token: SecretStr | None = None) -> str:
        """Local path for ``ref``; raises the store's typed errors. ``hf_token``: see ``LoraStore.resolve``."""
        scheme = url_scheme(ref)
        key = ref if scheme in (None, *FSSPEC_SCHEMES) else self._store.normalize(ref)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._store.resolve, ref, hf_token))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        else:
            self._merged += 1
        # shield: one canceled caller must not cancel the download the others wait for.
        return await asyncio.shield(task)

    async def stats(self) -> dict[str, int]:
        return {**self._store.stats(), "merged": self._merged, "inflight": len(self._inflight)}

    async def config(self) -> dict[str, Any]:
        return {"lora": self._lora_cfg.model_dump(), "fetch": self._fetch_cfg.model_dump()}


def config_key(lora_cfg: LoraCacheConfig, fetch_cfg: FetchConfig) -> str:
    """A short digest of the settings an actor enforces (no token: it comes with each call, never here)."""
    text = json.dumps([lora_cfg.model_dump(mode="json"), fetch_cfg.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_actor_name(node_id: str, key: str = "") -> str:
    return f"wan-lora-cache-{node_id}" + (f"-{key}" if key else "")


def get_or_create_cache_actor(lora_cfg: LoraCacheConfig, fetch_cfg: FetchConfig):
    """The LoRA cache actor of the calling node, created on first use (detached, pinned to this node).

    If a call on the handle raises ``RayActorError`` (the actor died for good), call this again: a
    dead named actor frees its name, so ``get_if_exists`` creates a fresh one.

    The name includes a digest of the configuration: a redeploy with other fetch rules or limits (or
    a second app with other settings on the same cluster) gets its own actor instead of silently
    sharing one created under the old rules. An actor of an old configuration stays idle (no CPU);
    ``ray.kill`` it to free its process.
    Non-blocking apart from the GCS lookup, so it may be called from async code.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    actor = (
        ray.remote(LoraCacheActor)
        .options(
            name=cache_actor_name(node_id, config_key(lora_cfg, fetch_cfg)),
            namespace=ACTOR_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            # Restarts (same node, same name) cover a crashed worker; in-flight calls still fail.
            max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        .remote(lora_cfg.model_dump(), fetch_cfg.model_dump())
    )
    return actor


def resolve_on_node(ref: str, lora_cfg: LoraCacheConfig, fetch_cfg: FetchConfig,
                    hf_token: SecretStr | None = None) -> str:
    """``LoraStore.resolve`` for a LoRA the configuration names (turbo's), blocking.

    Inside Ray through this node's cache actor, so the file is fetched once per node and shares the
    cache (and its quota) with the requests' LoRAs; outside Ray (a script, a test) through a store of
    this process.

    Raises:
        the store's typed errors; LoraFetchFailed when the node's cache actor keeps dying.
    """
    import ray

    if not ray.is_initialized():
        return LoraStore(lora_cfg, fetch_cfg).resolve(ref, hf_token)
    from ray.exceptions import RayActorError

    for attempt in range(2):
        try:
            return ray.get(get_or_create_cache_actor(lora_cfg, fetch_cfg).resolve.remote(ref, hf_token))
        except RayActorError as e:  # the node's cache actor died: a fresh one, once (as a replica does)
            if attempt:
                raise LoraFetchFailed(f"LoRA cache unavailable: {e}", {"ref": ref}) from e
    raise AssertionError("unreachable")
