"""Generation: a normalised spec -> video frames, with resident LoRAs, progress and cancellation.

Calls the stock ``WanImageToVideoPipeline`` exactly as the reference server does (same arguments,
CPU generator, ``max_sequence_length=512``), so results match it; what this module adds is around
that call: the sampler, the adapter weights, per-stage timings, progress and cancel between steps,
and the CUDA speed modes.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..config import SpeedConfig
from ..errors import Canceled, GenerationFailed, LoraIncompatible, OutOfMemory
from ..generator import Generator
from ..lora.files import linear_shapes, read_lora
from ..spec import GenerationSpec, Progress, adapter_name
from ..speed.exact import apply_speed_modes
from ..speed.exact import warmup as speed_warmup
from ..speed.modes import SpeedModes
from ..speed.vae import EncodeCache, channels_last
from . import compat
from .compat import plain_lora_layers
from .media_out import Mp4Stream
from .memory import MemoryPlan
from .models import LoadedModel

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # a shorter value silently feeds CLIP tokens to the text branch
DISTILL = "turbo_distill"  # the adapter name of turbo mode's distillation LoRA (never a user adapter's name)


def make_scheduler(name: str, checkpoint_scheduler):
    """The scheduler for a sampler name: the checkpoint's UniPC, or ai-toolkit's preview sampler."""
    if name == "unipc":
        return checkpoint_scheduler
    if name == "flowmatch_euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        # ai-toolkit samples its Wan training previews with flow-match Euler, shift 3.0.
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    raise ValueError(f"unknown sampler {name!r}")


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounded as diffusers' ``numpy_to_pil`` does."""
    return (frames * 255).round().astype("uint8")


# The components a request passes through, in order, and the stage each one's forward counts as.
STAGES = (
    ("text_encoder", "text_encode"),
    ("image_encoder", "image_encode"),
    ("vae.encoder", "vae_encode"),
    ("transformer", "denoise"),
    ("vae.decoder", "vae_decode"),
)
# The progress stage a request shows while in each timed stage.
PROGRESS_STAGES = {
    "text_encode": "encoding_text",
    "image_encode": "encoding_image",
    "vae_encode": "vae_encoding",
    "denoise": "denoising",
    "vae_decode": "vae_decoding",
}


class StageClock:
    """Accumulates the time spent in each pipeline component through forward hooks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self._open: dict[str, float] = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, stage: str):
        self._sync()
        self._open[stage] = time.perf_counter()

    def stop(self, stage: str):
        self._sync()
        began = self._open.pop(stage, None)
        if began is not None:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - began

    def attach(self, pipe) -> list:
        """Time every stage of ``pipe`` into this clock until the returned hook handles are removed."""
        return hook_stages(pipe, lambda: self)


class StageProgress:
    """A StageClock that also announces each stage once, when a generation first enters it.

    The encoders and the VAE run in several forwards (the VAE one per latent frame); only the first
    entry into a stage is news. A stage entered again after a later one (never in the stock pipeline)
    is not announced, so progress never goes backwards.
    """

    def __init__(self, clock: StageClock, on_progress: Callable[[Progress], None], total_steps: int):
        self.clock = clock
        self.on_progress = on_progress
        self.total_steps = total_steps
        self._order = [stage for _, stage in STAGES]
        self._reached = -1

    def start(self, stage: str):
        rank = self._order.index(stage)
        if rank > self._reached:
            self._reached = rank
            # The decode comes after the last step: it shows every step done, not a bar back at 0.
            step = self.total_steps if stage == "vae_decode" else 0
            self.on_progress(Progress(stage=PROGRESS_STAGES[stage], step=step, total_steps=self.total_steps))
        self.clock.start(stage)

    def stop(self, stage: str):
        self.clock.stop(stage)


def hook_stages(pipe, clock_of: Callable[[], "StageClock | StageProgress | None"]) -> list:
    """Forward hooks on each component of ``STAGES`` that time it into ``clock_of()`` (None: not timed).

    Returns:
        The hook handles (``.remove()`` each to detach).
    """
    handles = []
    for path, stage in STAGES:
        module = pipe
        for part in path.split("."):
            module = getattr(module, part)

        def start(*_, s=stage):
            clock = clock_of()
            if clock is not None:
                clock.start(s)

        def stop(*_, s=stage):
            clock = clock_of()
            if clock is not None:
                clock.stop(s)

        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    return handles


@dataclass
class Frames:
    """The frames of one generation and how long each stage took."""

    frames: np.ndarray  # (num_frames, height, width, 3) uint8
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    speed: dict = field(default_factory=dict)  # the speed mode used and what it did
    video: bytes | None = None  # the MP4, when it was encoded while the VAE decoded (``stream_video``)


class _DecodeStream:
    """Turns each decoder chunk into uint8 frames exactly as the pipeline's output is made, and encodes them.

    The VAE decodes one latent frame at a time (``AutoencoderKLWan._decode``), concatenates the chunks
    and clamps to [-1, 1]; the pipeline then post-processes to [0, 1] floats, which we round to uint8.
    All of it is elementwise, so doing it per chunk gives the same frames; ``finish`` checks that
    against the pipeline's own output and gives up (the caller encodes the whole) if not.
    """

    def __init__(self, encoder: Mp4Stream, video_processor):
        self.encoder = encoder
        self._processor = video_processor
        self._chunks: list[np.ndarray] = []

    def hook(self, module, args, out):
        chunk = torch.clamp(out, min=-1.0, max=1.0)
        frames = frames_to_uint8(self._processor.postprocess_video(chunk, output_type="np")[0])
        self._chunks.append(frames)
        self.encoder.add(frames)

    def finish(self, frames: np.ndarray) -> bytes | None:
        if not self._chunks or not np.array_equal(np.concatenate(self._chunks), frames):
            self.encoder.abort()
            return None
        return self.encoder.finish()


def _step_end(total_steps: int, on_progress: Callable[[Progress], None],
              should_cancel: Callable[[], bool] | None):
    """The pipeline's ``callback_on_step_end``: progress after each step, then the cancel check."""

    def step_end(pipe, i, t, kwargs):
        on_progress(Progress(stage="denoising", step=i + 1, total_steps=total_steps))
        if should_cancel and should_cancel():
            raise Canceled("canceled by request", {"step": i + 1})
        return {}

    return step_end


class WanGenerator(Generator):
    """Holds one loaded pipeline and its resident adapters; runs one generation at a time.

    The one-process ``generator.Generator``; ``WanGenerator`` itself is the default ``GeneratorFactory``.
    """

    def __init__(self, loaded: LoadedModel, speed: SpeedConfig | None = None, turbo_lora: str | None = None,
                 convert=None):
        """Args:
            loaded: the pipeline (changed in place: hooks, speed modes, adapters).
            speed: speed-ups and modes (default ``SpeedConfig()``).
            turbo_lora: the distillation LoRA's file on this node (startup resolves ``speed.turbo.lora`` with
                ``turbo.distill_lora_file``); default: ``speed.turbo.lora`` itself, as a local path.
            convert: tests only: what makes the fast kernels' Linear copies (default: FP8 on CUDA).
        """
        self.loaded = loaded
        self.pipe = loaded.pipe
        self.device = loaded.device
        self.speed = speed or SpeedConfig()
        self.memory = loaded.memory or MemoryPlan()
        if self.memory.offloader is not None and self.speed.compile_blocks:
            # Offloaded blocks swap their weights around each call, which a compiled block cannot see.
            self.speed = self.speed.model_copy(update={"compile_blocks": False})
        self._checkpoint_scheduler = self.pipe.scheduler
        self._schedulers = {"unipc": self._checkpoint_scheduler}
        self._shapes = linear_shapes(self.pipe.transformer)
        self.adapters: dict[str, str] = {}  # adapter name -> ref
        self.adapter_loads = 0
        self._lora_enabled = False
        # Hooked once for the generator's life; a clock is set only while ``generate`` runs.
        self._clock: StageProgress | None = None
        self._hooks = hook_stages(self.pipe, lambda: self._clock)
        if self.speed.vae_channels_last and self.device.type == "cuda":
            channels_last(self.pipe.vae)
        self.encodings = EncodeCache(self.pipe.vae, self.speed.vae_encode_cache, on_hit=self._encode_kept)
        # Speed modes (CUDA only; a no-op on CPU). With compiled blocks, adapters go through the
        # fixed LoRA slot (speed.LoraSlots) so that loads, switches and multipliers never recompile.
        with plain_lora_layers(self.memory.fp8):
            self.speed_report = apply_speed_modes(self.pipe, self.speed, self.device)
        self._slots = self.speed_report.pop("lora_slots", None)
        self._resident: dict = {}  # adapter name -> speed.ResidentAdapter (slot path only)
        # Fast and turbo modes on the same weights; exact mode's path is left as it was.
        self.modes = SpeedModes(self.pipe, self.speed, self.device, self.speed_report.get("attention_backend"),
                                [n for n in self._shapes if n.startswith("blocks.")], convert,
                                weights_fp8=self.memory.fp8)
        self.distill_loads = 0
        if "turbo" in self.modes.enabled:
            with plain_lora_layers(self.memory.fp8):
                self._load_distill(turbo_lora or self.speed.turbo.lora)
        self.speed_report["modes"] = self.modes.describe()
        self.speed_report["memory"] = self.memory.describe()
        if self.speed.warmup:
            self.warmup()

    def _encode_kept(self) -> None:
        """A kept first-frame encoding was used: the stage is announced and timed as if the VAE had run."""
        if self._clock is not None:
            self._clock.start("vae_encode")
            self._clock.stop("vae_encode")

    @property
    def speed_modes(self) -> tuple[str, ...]:
        return self.modes.enabled

    def warmup(self) -> dict:
        """Compile now, at replica start (idempotent; a no-op without speed modes, e.g. on CPU)."""
        if self.speed_report.get("applied") and "warmup" not in self.speed_report:
            self.speed_report["warmup"] = speed_warmup(self, self.speed)
            self.encodings.clear()  # the warm-up's pictures are nobody's
        return self.speed_report.get("warmup", {})

    # -- adapters ----------------------------------------------------------------------------

    def load_adapter(self, ref: str, path: str, max_header_bytes: int = 16 * 1024**2) -> str:
        """Make the LoRA at ``path`` resident under a name derived from ``ref``; idempotent."""
        name = adapter_name(ref)
        if name in self.adapters:
            return name
        lora = read_lora(path, self._shapes, type(self.pipe), max_header_bytes)
        self.modes.plain()  # peft must wrap the model's own Linears, never a mode's copies
        if self._slots is not None:
            self._resident[name] = self._slots.prepare(name, lora)  # raises LoraIncompatible
            self.adapters[name] = ref
            self.adapter_loads += 1
            return name
        try:
            self._load_into_transformer(name, lora)
        except torch.OutOfMemoryError as e:  # a RuntimeError too: not the file's fault
            self._drop_partial(name)
            self._free_memory()
            raise OutOfMemory(f"out of GPU memory while loading a LoRA: {e}", {"ref": ref}) from e
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            self._drop_partial(name)
            raise LoraIncompatible(f"LoRA could not be applied: {e}", {"ref": ref}) from e
        self.adapters[name] = ref
        self.adapter_loads += 1
        self._lora_enabled = True
        return name

    def _load_distill(self, path: str) -> None:
        """Turbo's distillation LoRA, resident for the replica's life: a fixed adapter beside the slot on
        the compiled path, a peft adapter like any other on the eager path; active in turbo requests only.

        Kept apart from the base weights (not fused): exact and fast share those weights, and the user's
        adapters stay switchable on top of it.
        """
        lora = read_lora(path, self._shapes, type(self.pipe))
        strength = self.speed.turbo.strength
        if self._slots is not None:
            self._slots.add_fixed(DISTILL, lora, strength)
        else:
            self._load_into_transformer(DISTILL, lora)
            self._lora_enabled = True  # loading activated it: the next request sets adapters explicitly
        self.distill_loads += 1
        self.speed_report["turbo_lora"] = {"path": path, "format": lora.format, "strength": strength}

    def _load_into_transformer(self, name: str, lora) -> None:
        """Stock ``load_lora_weights(path, adapter_name=name)``, from the file already read and checked.

        Stock reads the file itself to get the adapter metadata (``lora_alpha``); given a state dict
        it has none and applies every layer at scale 1. So this is the rest of its body, with the
        metadata it would have read.
        """
        pipe = self.pipe
        state_dict = compat.expand_t2v_lora_for_i2v(pipe, dict(lora.state_dict))
        with plain_lora_layers(self.memory.fp8):
            pipe.load_lora_into_transformer(
                state_dict,
                transformer=pipe.transformer,
                adapter_name=name,
                metadata=lora.metadata,
                _pipeline=pipe,
                low_cpu_mem_usage=compat.default_low_cpu_mem_usage_lora(),
                hotswap=False,
            )
        # peft makes a file's lora_dropout (p > 0 in some training metadata) in training mode, so
        # stock would drop random activations at inference; the one place we do not follow it.
        pipe.transformer.eval()

    def _drop_partial(self, name: str):
        try:
            self.pipe.delete_adapters([name])
        except Exception:  # nothing was registered under that name
            pass

    def delete_adapter(self, ref: str) -> None:
        name = adapter_name(ref)
        if self._slots is not None:
            if self.adapters.pop(name, None) is not None:
                self._resident.pop(name, None)
                self._slots.invalidate(name)
            return
        if self.adapters.pop(name, None) is not None:
            self.pipe.delete_adapters([name])
            # peft activates some other resident adapter in place of a deleted active one (turbo's
            # distillation LoRA too): adapters off, as between requests; the next one sets its own.
            if self._lora_enabled:
                self.pipe.disable_lora()
                self._lora_enabled = False

    def _activate(self, spec: GenerationSpec) -> None:
        """Set this request's adapters and multipliers; no LoRA means the untouched base model.

        In turbo mode the distillation LoRA is active too, under the user's.
        """
        turbo = getattr(spec, "speed", "exact") == "turbo"
        names = [adapter_name(lora.ref) for lora in spec.loras]
        missing = [lora.ref for lora in spec.loras if adapter_name(lora.ref) not in self.adapters]
        if missing:
            raise GenerationFailed(f"adapters not loaded: {missing}")
        if self._slots is not None:
            self._slots.apply([(self._resident[n], lora.multiplier) for n, lora in zip(names, spec.loras)])
            if self._slots.fixed is not None:
                self._slots.use_fixed(turbo)
            return
        weights = [lora.multiplier for lora in spec.loras]
        if turbo:
            names, weights = names + [DISTILL], weights + [self.speed.turbo.strength]
        if names:
            self.pipe.enable_lora()
            # Always set, so a multiplier change (back to 1.0 included) takes effect.
            self.pipe.set_adapters(names, weights)
            self._lora_enabled = True
        elif self._lora_enabled:
            self.pipe.disable_lora()  # restores the base output bit-exactly
            self._lora_enabled = False

    # -- generation --------------------------------------------------------------------------

    def scheduler_for(self, sampler: str):
        if sampler not in self._schedulers:
            self._schedulers[sampler] = make_scheduler(sampler, self._checkpoint_scheduler)
        return self._schedulers[sampler]

    def scheduler_for_spec(self, spec: GenerationSpec):
        """The scheduler a request runs: turbo's own, else its sampler's."""
        if spec.speed == "turbo" and self.modes.turbo_scheduler is not None:
            return self.modes.turbo_scheduler
        return self.scheduler_for(spec.sampler)

    @torch.inference_mode()
    def generate(
        self,
        spec: GenerationSpec,
        on_progress: Callable[[Progress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        stream_video: bool = False,
    ) -> Frames:
        """Run one spec to frames.

        Args:
            spec: the normalised request; its LoRAs must already be resident.
            on_progress: called as each stage begins (``PROGRESS_STAGES``, in that order: the
                text and image encoders, the VAE encode, denoising at step 0, the VAE decode at the
                last step) and after each denoising step.
            should_cancel: polled after each step; True stops the run with ``Canceled``.
            stream_video: for MP4, encode each chunk of frames as the VAE decodes it (``Frames.video``),
                so little of the encoding is left once the decode ends.
        Raises:
            Canceled, OutOfMemory, GenerationFailed.
        """
        from PIL import Image

        on_progress = on_progress or (lambda p: None)
        clock = StageClock(self.device)
        t0 = time.perf_counter()

        # 1. Adapters, speed mode and sampler for this request.
        self.modes.check(spec)
        self._activate(spec)
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        mode = self.modes.begin(spec, generator)
        hits = self.encodings.hits
        self.pipe.scheduler = self.scheduler_for_spec(spec)

        # 2. Inputs exactly as the reference passes them.
        image = Image.open(io.BytesIO(spec.image_png)).convert("RGB")
        step_end = _step_end(spec.steps, on_progress, should_cancel)

        # 3. The stock pipeline call; the stage hooks time each component and announce it as it begins.
        stream = self._video_stream(spec) if stream_video else None
        try:
            out = self._call_pipeline(spec, image, generator, step_end, StageProgress(clock, on_progress, spec.steps),
                                      stream)
        finally:
            report = self.modes.end(mode)
            if spec.speed == "turbo":  # between requests the distillation LoRA is off too
                self._activate(spec.model_copy(update={"speed": "exact"}))

        # 4. Frames, timings, and the video if it was encoded while the VAE decoded.
        frames = frames_to_uint8(out.frames[0])
        clock.totals["total"] = time.perf_counter() - t0
        timings = {k: round(v, 4) for k, v in clock.totals.items()}
        video = self._finish_stream(stream, frames, timings) if stream is not None else None
        report.update(steps=spec.steps, guidance_scale=spec.guidance_scale)
        memory = {"mode": self.memory.mode, "fp8_weights": self.memory.fp8}
        report["memory"] = {**memory, "note": self.memory.note} if self.memory.note else memory
        report.setdefault("forwards_computed", spec.steps * mode.branches)
        report.setdefault("forwards_skipped", 0)
        report["vae_encode_reused"] = self.encodings.hits > hits
        return Frames(frames=frames, seed=spec.seed, timings=timings, video=video, speed=report)

    def _call_pipeline(self, spec: GenerationSpec, image, generator, step_end, progress: StageProgress,
                       stream: "_DecodeStream | None"):
        """The stock pipeline call, its failures typed; the decoder hook only reads the chunks the VAE makes."""
        hook = self.pipe.vae.decoder.register_forward_hook(stream.hook) if stream is not None else None
        self._clock = progress
        try:
            return self.pipe(
                image=image,
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                height=spec.height,
                width=spec.width,
                num_frames=spec.num_frames,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=generator,
                output_type="np",
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                callback_on_step_end=step_end,
            )
        except BaseException as e:
            if stream is not None:
                stream.encoder.abort()
            if isinstance(e, Canceled):
                raise
            self._free_memory()
            if isinstance(e, torch.OutOfMemoryError):
                raise OutOfMemory(f"out of GPU memory: {e}") from e
            if isinstance(e, Exception):
                raise GenerationFailed(f"generation failed: {type(e).__name__}: {e}") from e
            raise
        finally:
            self._clock = None
            if hook is not None:
                hook.remove()

    @staticmethod
    def _finish_stream(stream: "_DecodeStream", frames: np.ndarray, timings: dict) -> bytes | None:
        """The streamed MP4 (timing what was left after the decode), or None: the caller encodes the whole."""
        t_tail = time.perf_counter()
        try:
            video = stream.finish(frames)  # None if the chunks were not the output's frames
        except Exception as e:  # the caller encodes the whole video instead, and reports its errors
            log.warning("streamed video encoding failed (%s: %s); encoding after the decode", type(e).__name__, e)
            return None
        if video is not None:
            timings["encode_video"] = round(time.perf_counter() - t_tail, 4)
        return video

    def _video_stream(self, spec: GenerationSpec) -> "_DecodeStream | None":
        """An MP4 encoder fed from the VAE decoder's chunks, where the decode makes whole frames in order."""
        vae = self.pipe.vae
        if spec.output_format != "mp4" or getattr(vae, "use_tiling", False) or vae.config.get("patch_size"):
            return None  # tiles or patches: the decoder's outputs are not frames in order
        return _DecodeStream(Mp4Stream(spec.fps), self.pipe.video_processor)

    def _free_memory(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
