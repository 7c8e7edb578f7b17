"""Model sources: turn a configured source into a loaded ``WanImageToVideoPipeline``.

One loading path for every real source: a hub id, a local diffusers directory and the ``tiny``
checkpoint (built offline, saved in diffusers format, then loaded like the real one) all go
through ``WanImageToVideoPipeline.from_pretrained``. ``random-full`` builds the full-size
architecture with random weights directly on the GPU, for benchmarks only.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig

log = logging.getLogger(__name__)


class _TorchvisionFallback(logging.Filter):
    """Drops transformers' one warning that ``CLIPImageProcessor`` falls back to ``CLIPImageProcessorPil``.

    torchvision is left out on purpose (the PIL processor is the one we run and test, see
    pitfalls), and diffusers asks for ``CLIPImageProcessor`` by the name in the checkpoint's
    ``model_index.json``, so the warning came on every start. Every other message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# transformers' logger of that warning (transformers.utils.import_utils), before transformers is imported.
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallback())

TINY = "tiny"
RANDOM_FULL = "random-full"
TINY_VERSION = "1"  # bump when the tiny recipe changes, so cached copies are rebuilt

# The real checkpoint's scheduler (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers/scheduler).
WAN_UNIPC_CONFIG = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

# The I2V-14B-480P transformer (16.4 B parameters).
FULL_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=1280,
    added_kv_proj_dim=5120,
    rope_max_seq_len=1024,
)

TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=36,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=32,
    added_kv_proj_dim=16,  # = heads x head_dim, as in the real checkpoint (5120)
    rope_max_seq_len=1024,
)

_TOKENIZER_CORPUS = (
    "a cinematic shot of a runner on a beach handheld camera slow motion close up wide angle "
    "the quick brown fox jumps over the lazy dog at sunset golden hour soft light "
    "a woman walks through a neon city street at night rain reflections bokeh "
    "a cat sits on a windowsill watching birds outside the camera pans left to right "
    "trigger sks ohwx portrait of a person smiling turning their head waves dancing "
    "ocean waves crash on rocks drone footage mountains forest river clouds timelapse "
    "blurry low quality distorted deformed static frame watermark text artifacts"
)


# Pipelines loaded in this process, counted where the load completes: a replica's stats report it,
# so "the base model was not reloaded" is checked against what happened, not what was meant.
_loads = 0
_loads_lock = threading.Lock()


def pipeline_loads() -> int:
    """How many pipelines ``load_pipeline`` has loaded in this process."""
    return _loads


@dataclass
class LoadedModel:
    """A pipeline on its device, with what was used to load it."""

    pipe: "object"
    device: torch.device
    dtype: torch.dtype
    source: str
    load_seconds: float
    memory: "object | None" = None  # memory.MemoryPlan: how the weights are kept (None: all on the device)


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


# ---------------------------------------------------------------------------------------------
# tiny: a miniature of every component, random weights, deterministic
# ---------------------------------------------------------------------------------------------


def _train_tokenizer(out_dir: Path):
    """Train a small sentencepiece unigram model offline; the UMT5 vocab is sized from it."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    sentences = _TOKENIZER_CORPUS.split(" ")
    sentences = [" ".join(sentences[i : i + 8]) for i in range(0, len(sentences), 3)] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=256,
        model_type="unigram",
        hard_vocab_limit=False,  # the corpus is small: take what it gives
        num_threads=1,
        shuffle_input_sentence=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model.getvalue())
        # transformers 5 ignores T5Tokenizer(vocab_file=...); from_pretrained on the dir works.
        tokenizer = T5Tokenizer.from_pretrained(tmp, extra_ids=0)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    return tokenizer


def build_tiny(out_dir: str | os.PathLike) -> Path:
    """Write the tiny checkpoint (every component of the real one, miniature) in diffusers format.

    Deterministic: building twice gives identical weights.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(out)

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    text_encoder.save_pretrained(out / "text_encoder")

    torch.manual_seed(1)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    image_encoder.save_pretrained(out / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        out / "image_processor"
    )

    torch.manual_seed(2)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    vae.save_pretrained(out / "vae")

    torch.manual_seed(3)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
    transformer.save_pretrained(out / "transformer")

    UniPCMultistepScheduler(**WAN_UNIPC_CONFIG).save_pretrained(out / "scheduler")

    index = {
        "_class_name": "WanImageToVideoPipeline",
        "_diffusers_version": _diffusers_version(),
        "boundary_ratio": None,
        "expand_timesteps": False,
        "image_encoder": ["transformers", "CLIPVisionModel"],
        "image_processor": ["transformers", type(_load_processor(out)).__name__],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "TINY_VERSION").write_text(TINY_VERSION)
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _load_processor(out: Path):
    # Without torchvision transformers hands back CLIPImageProcessorPil; record what it loads.
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(out / "image_processor")


def ensure_tiny(cache_dir: str | os.PathLike) -> Path:
    """Build the tiny checkpoint into ``cache_dir/tiny`` once (safe across processes)."""
    cache = Path(cache_dir).expanduser()  # "~": the node-local home of the process that builds it
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / "tiny"
    with open(cache / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = target / "TINY_VERSION"
        if marker.exists() and marker.read_text() == TINY_VERSION:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache))
        build_tiny(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------
# random-full: the real architecture, random weights, on the GPU (benchmarks only)
# ---------------------------------------------------------------------------------------------


def build_random_full(device: torch.device, dtype: torch.dtype, tokenizer_dir: str | os.PathLike):
    """Every component at full size with random weights, built directly on ``device``."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**FULL_TRANSFORMER_CONFIG).to(dtype).eval()
        text_encoder = (
            UMT5EncoderModel(
                UMT5Config(
                    vocab_size=256384,
                    d_model=4096,
                    d_kv=64,
                    d_ff=10240,
                    num_layers=24,
                    num_heads=64,
                    relative_attention_num_buckets=32,
                    relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False,
                )
            )
            .to(dtype)
            .eval()
        )
        image_encoder = (
            CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=1280,
                    intermediate_size=5120,
                    projection_dim=1024,
                    num_hidden_layers=32,
                    num_attention_heads=16,
                    image_size=224,
                    patch_size=14,
                    hidden_act="gelu",
                )
            )
            .to(dtype)
            .eval()
        )
        vae = AutoencoderKLWan().to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer_dir))
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**WAN_UNIPC_CONFIG),
        image_processor=processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )


# ---------------------------------------------------------------------------------------------
# the one entry point
# ---------------------------------------------------------------------------------------------


def load_pipeline(cfg: ModelConfig, memory: str = "full", convert=None) -> LoadedModel:
    """Load the configured source onto its device.

    Args:
        cfg: the model section of the config.
        memory: ``gpu.memory`` (``memory.apply_memory_mode``). Other than ``full``, a checkpoint is read into
            host memory and the mode puts it on the device block by block, so the card never holds the
            whole model in bf16.
        convert: tests only: the FP8 conversion of the memory mode (default: torchao on CUDA).
    Returns:
        The loaded pipeline with its device and dtype.
    """
    from diffusers import WanImageToVideoPipeline

    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    t0 = time.perf_counter()
    if cfg.source == RANDOM_FULL:
        if device.type != "cuda":
            raise ValueError("the random-full source is for GPU benchmarks only (device must be cuda)")
        tiny_dir = ensure_tiny(cfg.cache_dir)
        pipe = build_random_full(device, dtype, tiny_dir / "tokenizer")
    else:
        location = str(ensure_tiny(cfg.cache_dir)) if cfg.source == TINY else cfg.source
        secret = cfg.token()
        token = secret.get_secret_value() if secret is not None else None
        kwargs = {"cache_dir": str(Path(cfg.cache_dir).expanduser() / "hub")} if not Path(location).is_dir() else {}
        if cfg.load_direct and memory == "full":
            # Each component's safetensors are read straight into the device's memory (on CUDA, the
            # current GPU), not into host memory and then copied: half the copying, no host RAM.
            kwargs["device_map"] = device.type
        try:
            pipe = WanImageToVideoPipeline.from_pretrained(location, dtype=dtype, token=token, **kwargs)
        except (ValueError, NotImplementedError) as e:  # a diffusers that refuses the device map
            if "device_map" not in kwargs:
                raise
            log.warning("loading straight to %s failed (%s); loading through host memory", device, e)
            kwargs.pop("device_map")
            pipe = WanImageToVideoPipeline.from_pretrained(location, dtype=dtype, token=token, **kwargs)
    from .memory import apply_memory_mode

    plan = apply_memory_mode(pipe, memory, device, convert)  # full: pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    seconds = time.perf_counter() - t0
    global _loads
    with _loads_lock:
        _loads += 1
    log.info("loaded %s on %s (%s, memory %s) in %.1fs", cfg.source, device, dtype, memory, seconds)
    return LoadedModel(pipe=pipe, device=device, dtype=dtype, source=cfg.source, load_seconds=seconds, memory=plan)
