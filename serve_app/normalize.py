"""HTTP request -> generation specs, with the reference server's semantics and our limits.

Every normalised value (snapped sizes, 4k+1 frames, resolved seeds) is the one the spec carries
and the result reports.
"""

from __future__ import annotations

import secrets

from deployments.contract import (
    OUTPUT_FORMATS,
    SAMPLERS,
    SPEED_MODES,
    FetchConfig,
    GenerationSpec,
    InvalidRequest,
    LoraRef,
    check_in_root,
    check_splittable,
    is_root_relative,
    snap_frames,
    snap_size,
    validate_ref,
)

from .config import AppConfig
from .media_in import prepare_ctrl_image
from .schemas import InferenceRequest, PromptIn

TRIGGER = "[trigger]"


def _invalid(code: str, message: str, details: dict | None = None) -> InvalidRequest:
    """A request this server will not run: 400 with ``code`` (mapped in ``errors.py``)."""
    return InvalidRequest(message, details, code)


def _limit(code: str, message: str, **details) -> InvalidRequest:
    """A request over one of ``cfg.limits`` (the limit and the value in its details)."""
    return InvalidRequest(message, details, code)


def check_model(req: InferenceRequest, cfg: AppConfig) -> None:
    if req.model != cfg.gpu.model.model_id:
        raise _invalid("MODEL_NOT_FOUND", f"Model '{req.model}' is not supported",
                       {"supported_models": [cfg.gpu.model.model_id]})


def lora_refs(req: InferenceRequest, cfg: AppConfig) -> tuple[LoraRef, ...]:
    """The request's LoRAs, checked (count, MoE field, duplicates, syntax; files in a root the ingress sees)."""
    if len(req.loras) > cfg.limits.max_loras:
        raise _limit("TOO_MANY_LORAS", f"at most {cfg.limits.max_loras} LoRAs per request, got {len(req.loras)}",
                     limit=cfg.limits.max_loras, value=len(req.loras))
    if any(lora.transformer is not None for lora in req.loras):
        raise _invalid("MOE_FORMAT_NOT_SUPPORTED",
                       f"Model '{req.model}' does not support MoE LoRA format (transformer must be null)")
    seen: set[str] = set()
    refs = []
    for i, lora in enumerate(req.loras):
        path = lora.path.strip()
        if path in seen:
            raise _invalid("DUPLICATE_LORA", f"LoRA {path!r} is listed twice", {"index": i})
        seen.add(path)
        validate_ref(path, cfg.gpu.fetch)
        refs.append(LoraRef(ref=path, multiplier=lora.network_multiplier))
    # After every syntax check, so a malformed list is refused the same way whatever the disk holds.
    if cfg.ingress.lora_root_visible:
        for ref in refs:
            if is_root_relative(ref.ref):
                check_in_root(cfg.gpu.lora, ref.ref)  # an object-store root: one HEAD
    return tuple(refs)


def _choice(value: str | None, default: str, allowed: tuple[str, ...], code: str, what: str, index: int) -> str:
    chosen = (value or default).strip().lower()
    if chosen not in allowed:
        raise _invalid(code, f"unknown {what} {value!r}; use one of {list(allowed)}",
                       {"prompt_index": index, "allowed": list(allowed)})
    return chosen


def speed_mode(p: PromptIn, req: InferenceRequest, cfg: AppConfig, index: int) -> str:
    """The prompt's speed mode (its own, else the request's, else the default), if the server runs it."""
    enabled = cfg.gpu.model.speed.enabled_modes()
    value = p.speed or req.speed
    chosen = (value or cfg.defaults.speed).strip().lower()
    if chosen not in enabled:
        why = "is not enabled on this server" if chosen in SPEED_MODES else "is unknown"
        raise _invalid("SPEED_MODE_NOT_SUPPORTED", f"speed mode {value!r} {why}; use one of {list(enabled)}",
                       {"prompt_index": index, "allowed": list(enabled)})
    return chosen


def steps_and_guidance(p: PromptIn, mode: str, cfg: AppConfig) -> tuple[int, float]:
    """What the prompt runs: its steps and guidance, except in turbo, where the distillation fixes both
    (its step count, no CFG); the result reports the values used."""
    if mode == "turbo":
        return cfg.gpu.model.speed.turbo.steps, 1.0
    d = cfg.defaults
    return (p.sample_steps if p.sample_steps is not None else d.sample_steps,
            p.guidance_scale if p.guidance_scale is not None else d.guidance_scale)


def prompt_text(p: PromptIn, req: InferenceRequest) -> str:
    """Every literal [trigger] replaced by the prompt's trigger word, else the request's (not in neg)."""
    word = p.trigger_word if p.trigger_word is not None else req.trigger_word
    return p.prompt.replace(TRIGGER, word) if word is not None else p.prompt


def resolve_seed(seed: int | None, index: int, base_seed: int) -> int:
    if seed is None:
        return base_seed + index
    if seed == -1:
        return secrets.randbelow(2**32)
    return seed


def check_sizes(index: int, width: int, height: int, frames: int, steps: int, cfg: AppConfig) -> None:
    lim = cfg.limits
    long_side, short_side = max(width, height), min(width, height)
    if short_side < lim.min_side or long_side > lim.max_long_side or short_side > lim.max_short_side:
        raise _limit("SIZE_OUT_OF_RANGE",
                     f"{width}x{height} (after snapping to 16) is outside {lim.min_side}..{lim.max_long_side} "
                     f"on the long side and {lim.min_side}..{lim.max_short_side} on the short side",
                     prompt_index=index, width=width, height=height)
    if frames > lim.max_frames:
        raise _limit("FRAMES_OUT_OF_RANGE", f"num_frames {frames} (after snapping to 4k+1) exceeds {lim.max_frames}",
                     prompt_index=index, value=frames, limit=lim.max_frames)
    if steps > lim.max_steps:
        raise _limit("STEPS_OUT_OF_RANGE", f"sample_steps {steps} exceeds {lim.max_steps}",
                     prompt_index=index, value=steps, limit=lim.max_steps)
    work = width * height * frames * steps
    if work > lim.max_work:
        raise _limit("WORK_TOO_LARGE", f"width x height x frames x steps = {work} exceeds {lim.max_work}",
                     prompt_index=index, value=work, limit=lim.max_work)
    unsplittable = check_splittable(cfg.gpu.parallel, width, height, frames)
    if unsplittable:  # a replica across several GPUs splits every pass's tokens evenly over them
        raise _limit("SIZE_NOT_SPLITTABLE", unsplittable, prompt_index=index, width=width, height=height,
                     num_frames=frames, sequence_degree=cfg.gpu.parallel.sequence_degree)


def check_request_shape(req: InferenceRequest, cfg: AppConfig) -> None:
    """Cheap checks that need no image: model, counts, prompt lengths, choices, sizes."""
    check_model(req, cfg)
    if len(req.prompts) > cfg.limits.max_prompts:
        raise _limit("TOO_MANY_PROMPTS", f"at most {cfg.limits.max_prompts} prompts per request",
                     limit=cfg.limits.max_prompts, value=len(req.prompts))
    d = cfg.defaults
    for i, p in enumerate(req.prompts):
        # The prompt is measured after [trigger] substitution: a short prompt of many [trigger]s
        # and a long trigger word would otherwise expand far past the limit.
        for field, text in (("prompt", prompt_text(p, req)), ("neg", p.neg)):
            if len(text) > cfg.limits.max_prompt_chars:
                raise _limit("PROMPT_TOO_LONG", f"{field} of prompt {i} is longer than {cfg.limits.max_prompt_chars} "
                             "characters", prompt_index=i, field=field, limit=cfg.limits.max_prompt_chars)
        _choice(p.sampler or req.sampler, d.sampler, SAMPLERS, "SAMPLER_NOT_SUPPORTED", "sampler", i)
        _choice(p.output_format or req.output_format, d.output_format, OUTPUT_FORMATS,
                "OUTPUT_FORMAT_NOT_SUPPORTED", "output_format", i)
        mode = speed_mode(p, req, cfg, i)
        width = snap_size(p.width if p.width is not None else d.width)
        height = snap_size(p.height if p.height is not None else d.height)
        frames = snap_frames(p.num_frames if p.num_frames is not None else d.num_frames)
        steps, _ = steps_and_guidance(p, mode, cfg)
        check_sizes(i, width, height, frames, steps, cfg)
        if not p.ctrl_img:
            raise _invalid("CONTROL_IMAGE_REQUIRED",
                           f"Model '{req.model}' requires a control image for prompt {i}",
                           {"model": req.model, "prompt_index": i})


def to_specs(req: InferenceRequest, cfg: AppConfig, fetch: FetchConfig | None = None) -> list[GenerationSpec]:
    """Validate and normalise a whole request; raises InvalidRequest (or a LoRA's error) at the first problem."""
    check_request_shape(req, cfg)
    loras = lora_refs(req, cfg)
    d = cfg.defaults
    specs = []
    for i, p in enumerate(req.prompts):
        width = snap_size(p.width if p.width is not None else d.width)
        height = snap_size(p.height if p.height is not None else d.height)
        mode = speed_mode(p, req, cfg, i)
        steps, guidance = steps_and_guidance(p, mode, cfg)
        specs.append(
            GenerationSpec(
                prompt=prompt_text(p, req),
                # neg defaults to "" in the schema, so only a neg the client sent overrides the config's.
                negative_prompt=p.neg if "neg" in p.model_fields_set else d.negative_prompt,
                width=width,
                height=height,
                num_frames=snap_frames(p.num_frames if p.num_frames is not None else d.num_frames),
                fps=p.fps if p.fps is not None else d.fps,
                steps=steps,
                guidance_scale=guidance,
                seed=resolve_seed(p.seed, i, d.base_seed),
                sampler=_choice(p.sampler or req.sampler, d.sampler, SAMPLERS, "SAMPLER_NOT_SUPPORTED", "sampler", i),
                output_format=_choice(p.output_format or req.output_format, d.output_format, OUTPUT_FORMATS,
                                      "OUTPUT_FORMAT_NOT_SUPPORTED", "output_format", i),
                image_png=prepare_ctrl_image(p.ctrl_img, width, height, i, cfg.limits, fetch or cfg.gpu.fetch),
                loras=loras,
                speed=mode,
            )
        )
    return specs
