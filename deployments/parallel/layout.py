"""One request across several GPUs: the ``gpu.parallel`` config section and its rank arithmetic.

A replica with ``degree`` N > 1 owns N GPUs, one process (rank) each, and runs every request on all
of them: the conditional and unconditional passes of classifier-free guidance on different ranks
(``cfg_degree`` 2), times sequence parallelism inside each pass (``ulysses_degree`` x
``ring_degree``, diffusers' context parallelism). Ranks are laid out row-major over
(cfg, ring, ulysses), the order of the device mesh ``deployments/parallel/ranks.py`` builds.

No torch here: the ingress validates the whole config too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Set in every rank's environment before torch loads: NVLink multicast (NVLS) can take a shared
# host's GPUs out of service; the plain NCCL paths are what we use.
DEFAULT_RANK_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


class ParallelConfig(BaseModel):
    """How many GPUs one request runs on, and how the work is split between them."""

    model_config = ConfigDict(extra="forbid")

    degree: int = Field(1, ge=1, description="GPUs (ranks) per replica, each request runs on all; 1: one GPU")
    cfg_degree: int | None = Field(
        None, ge=1, le=2, description="1, or 2: conditional and unconditional passes on different ranks"
    )
    ulysses_degree: int | None = Field(None, ge=1, description="Ulysses sequence parallelism (all-to-all on heads)")
    ring_degree: int | None = Field(None, ge=1, description="ring attention sequence parallelism")
    attention_heads: int = Field(40, ge=1, description="the transformer's attention heads (checked again at load)")
    gpus_per_node: int = Field(8, ge=1, description="GPUs on one node: a replica's ranks all live on one node")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: NCCL on CUDA, gloo on CPU")
    rank_cpus: float = Field(1.0, ge=0, description="CPUs each rank's process reserves (its GPU comes from "
                             "replica.num_gpus, which is per rank here)")
    timeout_s: float = Field(
        600.0, gt=0, description="a collective that waits longer fails (a rank that died mid-request)"
    )
    startup_timeout_s: float = Field(
        1800.0, gt=0, description="every rank must have loaded, compiled and warmed up within this, or the "
        "replica fails to start (Serve then retries it)",
    )
    error_grace_s: float = Field(
        60.0, gt=0, description="after one rank fails, how long the others may take to stop before the replica "
        "is marked unhealthy and replaced",
    )
    one_visible_gpu: bool = Field(
        False, description="each rank sees only its own GPU (Ray's default). Off: ranks see the GPUs of the node "
        "and pick theirs, so NCCL can use peer-to-peer copies between them (it cannot between processes that "
        "do not see each other's GPU)",
    )
    env: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_RANK_ENV), description="environment of every rank's process"
    )

    @model_validator(mode="after")
    def _split(self):
        given = [self.cfg_degree, self.ulysses_degree, self.ring_degree]
        if all(v is None for v in given):
            # The default split: CFG across 2 ranks where N is even (no communication inside a pass),
            # Ulysses for the rest (one all-to-all per attention, cheap on NVLink).
            self.cfg_degree = 2 if self.degree % 2 == 0 else 1
            self.ulysses_degree = self.degree // self.cfg_degree
            self.ring_degree = 1
        else:
            self.cfg_degree = self.cfg_degree or 1
            self.ulysses_degree = self.ulysses_degree or 1
            self.ring_degree = self.ring_degree or 1
        product = self.cfg_degree * self.ulysses_degree * self.ring_degree
        if product != self.degree:
            raise ValueError(
                f"parallel.degree {self.degree} must equal cfg_degree x ulysses_degree x ring_degree "
                f"({self.cfg_degree} x {self.ulysses_degree} x {self.ring_degree} = {product})"
            )
        if self.degree > self.gpus_per_node:
            raise ValueError(
                f"parallel.degree {self.degree} does not fit one node of {self.gpus_per_node} GPUs "
                "(parallel.gpus_per_node): a replica's ranks must share a node"
            )
        self.check_heads(self.attention_heads)
        return self

    def check_heads(self, heads: int) -> None:
        """Raise ``ValueError`` unless ``heads`` splits over the ranks (Ulysses splits heads)."""
        if heads % self.degree or heads % self.ulysses_degree:
            raise ValueError(
                f"parallel.degree {self.degree} (ulysses_degree {self.ulysses_degree}) must divide the "
                f"transformer's {heads} attention heads"
            )

    @property
    def sequence_degree(self) -> int:
        """Ranks one transformer pass is split over (Ulysses x ring)."""
        return self.ulysses_degree * self.ring_degree

    def layout(self, rank: int) -> "RankLayout":
        return RankLayout(rank, self.degree, self.cfg_degree, self.ring_degree, self.ulysses_degree)


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits in the (cfg, ring, ulysses) grid, row-major like ``init_device_mesh``."""

    rank: int
    world: int
    cfg_degree: int
    ring_degree: int
    ulysses_degree: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world or self.world != self.cfg_degree * self.ring_degree * self.ulysses_degree:
            raise ValueError(f"rank {self.rank} does not fit a world of {self.world} "
                             f"({self.cfg_degree} x {self.ring_degree} x {self.ulysses_degree})")

    @property
    def coordinate(self) -> tuple[int, int, int]:
        """(cfg index, ring index, ulysses index)."""
        sp = self.ring_degree * self.ulysses_degree
        return self.rank // sp, (self.rank % sp) // self.ulysses_degree, self.rank % self.ulysses_degree

    @property
    def cfg_rank(self) -> int:
        """0: this rank computes the conditional pass; 1: the unconditional one."""
        return self.coordinate[0]

    @property
    def sequence_rank(self) -> int:
        """This rank's slice of the token sequence (0 .. sequence degree - 1)."""
        return self.rank % (self.ring_degree * self.ulysses_degree)

    def cfg_peers(self) -> list[int]:
        """The ranks that exchange noise predictions with this one (same sequence slice), in cfg order."""
        sp = self.ring_degree * self.ulysses_degree
        return [c * sp + self.sequence_rank for c in range(self.cfg_degree)]


def sequence_tokens(width: int, height: int, num_frames: int) -> int:
    """Transformer tokens of one pass for Wan 2.1 (VAE 4x8x8, patch 1x2x2)."""
    latent_frames = (num_frames - 1) // 4 + 1
    return latent_frames * (height // 16) * (width // 16)


def check_splittable(cfg: ParallelConfig, width: int, height: int, num_frames: int) -> str | None:
    """Why a request of this size cannot be split over the sequence ranks, or None if it can."""
    tokens = sequence_tokens(width, height, num_frames)
    if tokens % cfg.sequence_degree:
        return (f"{width}x{height}x{num_frames} makes {tokens} tokens, which do not split evenly over "
                f"{cfg.sequence_degree} sequence-parallel GPUs; choose another size")
    return None
