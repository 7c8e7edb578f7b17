"""One rank of a parallel group: its process group, its device mesh, and the pipeline split across ranks.

Every rank holds the whole pipeline and runs the same stock pipeline call with the same inputs; what
differs is inside the transformer's forward:

- **CFG-parallel** (``cfg_degree`` 2, ours: diffusers has none): at each step's first (conditional)
  transformer call, cfg rank 0 computes the conditional pass and cfg rank 1 the unconditional one
  (its negative prompt embeddings captured from ``encode_prompt``); the two noise predictions are
  exchanged with one all-gather and the pipeline's second (unconditional) call returns the
  exchanged one without computing. So each rank combines the same two predictions, runs the same
  scheduler step, and holds the same latents as every other rank, bit for bit.
- **Sequence-parallel** (``ulysses_degree`` x ``ring_degree``): diffusers' context parallelism
  (``enable_parallelism``): tokens split over the ranks after the patch embedding, attention through
  Ulysses all-to-all and/or ring exchanges, the full sequence gathered again before the output head.

No Ray here: ``deployments/parallel/rank_group.py`` starts the processes; tests start them with
``torch.multiprocessing`` over gloo.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..engine import compat
from .layout import ParallelConfig, RankLayout

log = logging.getLogger(__name__)


class Ranks:
    """This process's place in a parallel group: the process group, the device mesh, its sub-groups."""

    def __init__(self, cfg: ParallelConfig, rank: int, init_method: str, device: torch.device):
        self.cfg = cfg
        self.layout: RankLayout = cfg.layout(rank)
        self.device = torch.device(device)
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.backend = backend
        if not dist.is_initialized():  # a test may reuse one group for several layouts
            kwargs = {"device_id": self.device} if backend == "nccl" else {}
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=cfg.degree,
                                    timeout=timedelta(seconds=cfg.timeout_s), **kwargs)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (cfg.cfg_degree, cfg.ring_degree, cfg.ulysses_degree),
                                     mesh_dim_names=("cfg", "ring", "ulysses"))
        if tuple(self.mesh.get_coordinate()) != self.layout.coordinate:
            raise RuntimeError(f"device mesh puts rank {rank} at {self.mesh.get_coordinate()}, "
                               f"expected {self.layout.coordinate}")
        self.cfg_group = self.mesh.get_group("cfg") if cfg.cfg_degree > 1 else None

    @property
    def rank(self) -> int:
        return self.layout.rank

    def _flag_tensor(self, value: int) -> torch.Tensor:
        # NCCL moves device tensors only; gloo host tensors.
        return torch.tensor([value], dtype=torch.int32, device=self.device if self.backend == "nccl" else "cpu")

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (a collective: every rank must call it)."""
        t = self._flag_tensor(int(flag))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, value) -> list:
        """``value`` of every rank, in rank order (a collective)."""
        out = [None] * self.cfg.degree
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class CfgParallel:
    """Computes each step's conditional and unconditional passes on the two cfg ranks at once.

    Installed as the transformer's outermost ``forward`` (outside diffusers' context-parallel hooks,
    so it sees and returns whole sequences). Relies on what ``WanImageToVideoPipeline`` does each
    step: the conditional call, then (CFG on) the unconditional call with the same latents, timestep
    and image embeddings and ``negative_prompt_embeds``; both with ``return_dict=False``.
    """

    def __init__(self, pipe, ranks: Ranks):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.ranks = ranks
        self.cfg_rank = ranks.layout.cfg_rank
        self._inner = self.transformer.forward  # possibly diffusers' hooked forward
        self._encode_prompt = pipe.encode_prompt
        self._negative: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None  # the unconditional prediction of the current step
        self.passes = 0  # transformer passes this rank computed (one per step with CFG on, not two)
        self.transformer.forward = self._forward
        pipe.encode_prompt = self._capture_prompts

    def _capture_prompts(self, *args, **kwargs):
        positive, negative = self._encode_prompt(*args, **kwargs)
        # A new pipeline call: nothing of the last one (a canceled run included) carries over.
        self._negative, self._pending = negative, None
        return positive, negative

    def _forward(self, *args, **kwargs):
        if not getattr(self.pipe, "do_classifier_free_guidance", False) or self._negative is None:
            self.passes += 1
            return self._inner(*args, **kwargs)  # CFG off: every cfg rank computes the same pass
        if kwargs.get("return_dict", True) or args:
            raise RuntimeError("CFG-parallel expects keyword arguments and return_dict=False")
        if self._pending is not None:  # the step's second call: computed on the other rank already
            uncond, self._pending = self._pending, None
            return (uncond,)
        if self.cfg_rank == 1:
            kwargs["encoder_hidden_states"] = self._negative.to(self.transformer.dtype)
        self.passes += 1
        mine = self._inner(*args, **kwargs)[0].contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=self.ranks.cfg_group)
        cond, self._pending = both
        return (cond,)


def _sequence_part(tensor, parts: int, index: int):
    """This rank's tokens, as the split hook on the first block cuts them (equal parts of dim 1)."""
    return tensor.chunk(parts, dim=1)[index]


def context_parallel_plan(transformer) -> dict:
    """Diffusers' plan for the model, with the gather moved from ``proj_out`` to ``norm_out``.

    A LoRA loaded through peft after the hooks are set wraps ``proj_out`` around the hooked layer,
    and would add its own (still split) output to the gathered one; ``norm_out`` is never a LoRA
    target, and the output head then runs on the whole sequence (a 5120 -> 64 projection, cheap).
    """
    plan = compat.context_parallel_plan(transformer)
    gather = plan.pop("proj_out")
    plan["norm_out"] = gather
    return plan


@dataclass
class Applied:
    """What ``apply_parallel`` did to a pipeline."""

    cfg_parallel: CfgParallel | None = None
    context_parallel: dict | None = None  # {"ulysses": u, "ring": r}

    def report(self) -> dict:
        return {"cfg_parallel": self.cfg_parallel is not None, "context_parallel": self.context_parallel,
                "passes": self.cfg_parallel.passes if self.cfg_parallel is not None else None}


def apply_parallel(pipe, ranks: Ranks) -> Applied:
    """Split ``pipe``'s transformer over the group (after speed modes; before the first forward).

    Raises:
        ValueError: the transformer's heads do not split over the ranks.
    """
    cfg = ranks.cfg
    transformer = pipe.transformer
    cfg.check_heads(transformer.config.num_attention_heads)
    applied = Applied()
    if cfg.sequence_degree > 1:
        compat.enable_context_parallel(transformer, context_parallel_plan(transformer), ring_degree=cfg.ring_degree,
                                       ulysses_degree=cfg.ulysses_degree, mesh=ranks.mesh["ring", "ulysses"],
                                       rank=ranks.rank, world_size=cfg.degree, device=ranks.device)
        applied.context_parallel = {"ulysses": cfg.ulysses_degree, "ring": cfg.ring_degree}
        from ..speed.step_cache import CachedBlocks

        if isinstance(transformer.blocks, CachedBlocks):  # fast mode's step cache works on this rank's tokens
            transformer.blocks.split = functools.partial(_sequence_part, parts=cfg.sequence_degree,
                                                         index=ranks.layout.sequence_rank)
    if cfg.cfg_degree > 1:
        applied.cfg_parallel = CfgParallel(pipe, ranks)
        from ..speed.step_cache import CachedBlocks

        if isinstance(transformer.blocks, CachedBlocks):  # fast mode's skips follow this rank's branch
            transformer.blocks.cfg_rank = ranks.layout.cfg_rank
    return applied


def weights_digest(pipe) -> dict[str, str]:
    """Per component, the float64 sum of every weight: equal on ranks that loaded the same weights."""
    out = {}
    for name, module in sorted(pipe.components.items()):
        params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
        if params:
            total = torch.stack([p.detach().sum(dtype=torch.float64) for p in params]).sum()
            out[name] = f"{total.item():.17g}/{len(params)}"
    return out


def check_same_weights(pipe, ranks: Ranks) -> None:
    """Every rank must hold the same weights (each combines the others' predictions with its own)."""
    digests = ranks.gather_objects(weights_digest(pipe))
    if any(d != digests[0] for d in digests):
        raise RuntimeError(f"ranks loaded different weights: {digests}")


def adapter_fingerprint(generator) -> dict:
    """What a rank's adapters are: names and a digest of every LoRA weight and scale it holds.

    Two ranks with the same fingerprint apply the same adapters with the same multipliers.
    """
    transformer = generator.pipe.transformer
    h = hashlib.sha256()
    tensors = 0
    for name, tensor in sorted(list(transformer.named_parameters()) + list(transformer.named_buffers())):
        if "lora_" not in name:
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
        tensors += 1
    from peft.tuners.lora import LoraLayer

    for name, module in sorted(transformer.named_modules()):
        if isinstance(module, LoraLayer):
            h.update(f"{name}:{sorted(module.scaling.items())}:{module.active_adapters}:"
                     f"{module.disable_adapters}".encode())
    resident = getattr(generator, "_resident", {})
    for name in sorted(resident):
        for module, ts in sorted(resident[name].pairs.items()):
            for t in ts:
                if t is not None:
                    h.update(t.detach().float().cpu().numpy().tobytes())
    return {"adapters": sorted(generator.adapters.values()), "lora_tensors": tensors, "digest": h.hexdigest()}
