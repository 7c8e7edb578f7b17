"""Generation (deployments/engine/pipeline.py) on the tiny checkpoint, fp32 on CPU.

Parity: the core's frames equal a direct ``WanImageToVideoPipeline(...)`` call with the same inputs,
made exactly as the reference server makes it, bit for bit, for both samplers. The direct call
runs on a separately loaded pipeline, so nothing the core does to its own pipeline (hooks,
scheduler swaps, adapters) can leak into the expected frames.
"""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.engine.pipeline import frames_to_uint8, make_scheduler
from deployments.errors import Canceled
from deployments.spec import GenerationSpec

from .conftest import make_image, stock_frames

STEPS = 3
SHAPE = (5, 48, 64, 3)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: on a busy 2-core machine two OpenMP threads were measured ~25x slower than one
    (0.3 s vs 8 s per generation), from spin-waiting. Both sides of every comparison run here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plain_pipe(tiny_dir):
    """A second, untouched pipeline loaded straight from the checkpoint directory."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.checkpoint_scheduler = pipe.scheduler
    return pipe


def reference_call(pipe, spec: GenerationSpec) -> np.ndarray:
    """The reference server's call, with its arguments, on a plain pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if spec.sampler == "flowmatch_euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    else:
        pipe.scheduler = pipe.checkpoint_scheduler
    image = make_image(spec.width, spec.height).convert("RGB")  # the picture behind spec.image_png
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(spec.image_png)).convert("RGB")))
    return frames_to_uint8(stock_frames(pipe, spec, image))


@contextmanager
def recording(pipe):
    """Count transformer passes and record the text encoder's input shapes while the block runs."""
    record = {"transformer_calls": 0, "text_shapes": []}

    def on_transformer(module, args, kwargs):
        record["transformer_calls"] += 1

    def on_text(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        record["text_shapes"].append(tuple(ids.shape))

    hooks = [
        pipe.transformer.register_forward_pre_hook(on_transformer, with_kwargs=True),
        pipe.text_encoder.register_forward_pre_hook(on_text, with_kwargs=True),
    ]
    try:
        yield record
    finally:
        for hook in hooks:
            hook.remove()


@pytest.fixture(scope="module")
def core_runs(generator):
    """Memoised core generations (each spec is run once per module), with what was recorded."""
    cache: dict = {}

    def run(spec: GenerationSpec):
        key = spec.model_dump_json()
        if key not in cache:
            events = []
            generator.encodings.clear()  # each run encodes its first frame (the kept path: test_vae_speed.py)
            with recording(generator.pipe) as record:
                result = generator.generate(spec, on_progress=events.append)
            cache[key] = (result, record, events)
        return cache[key]

    return run


@pytest.fixture
def spec(small_spec):
    def make(**overrides):
        return small_spec(**{"steps": STEPS, "negative_prompt": "blurry, static", **overrides})

    return make


# ---------------------------------------------------------------------------------------------
# parity with a direct diffusers call
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["unipc", "flowmatch_euler"])
def test_frames_equal_a_direct_pipeline_call(sampler, spec, core_runs, plain_pipe):
    s = spec(sampler=sampler)
    result, _, _ = core_runs(s)
    expected = reference_call(plain_pipe, s)
    assert result.frames.dtype == np.uint8 and result.frames.shape == SHAPE
    assert expected.shape == SHAPE
    assert result.frames.std() > 1  # a real picture, not a constant
    assert np.array_equal(result.frames, expected)
    assert result.seed == s.seed


def test_both_sides_start_from_the_checkpoints_unipc(plain_pipe, generator):
    # The unipc parity is only meaningful if the core uses the checkpoint's own scheduler.
    from diffusers import UniPCMultistepScheduler

    core = generator.scheduler_for("unipc")
    assert type(core) is type(plain_pipe.checkpoint_scheduler) is UniPCMultistepScheduler
    assert dict(core.config) == dict(plain_pipe.checkpoint_scheduler.config)


def test_samplers_give_different_frames(spec, core_runs):
    unipc, _, _ = core_runs(spec(sampler="unipc"))
    euler, _, _ = core_runs(spec(sampler="flowmatch_euler"))
    assert not np.array_equal(unipc.frames, euler.frames)


def test_flowmatch_scheduler_is_ai_toolkits():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = make_scheduler("flowmatch_euler", checkpoint_scheduler=object())
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler
    assert scheduler.config.shift == 3.0
    assert scheduler.config.num_train_timesteps == 1000


def test_unipc_is_the_checkpoint_scheduler():
    marker = object()
    assert make_scheduler("unipc", marker) is marker


@pytest.mark.parametrize("name", ["ddim", "", "UniPC ", "euler"])
def test_unknown_sampler_is_rejected(name, generator):
    with pytest.raises(ValueError):
        make_scheduler(name, generator.pipe.scheduler)
    with pytest.raises(ValueError):
        generator.scheduler_for(name)


def test_spec_refuses_unknown_sampler(spec):
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        spec(sampler="ddim")


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------


def test_same_seed_reproduces(spec, core_runs, generator):
    first, _, _ = core_runs(spec())
    again = generator.generate(spec())
    assert np.array_equal(first.frames, again.frames)


def test_different_seed_differs(spec, core_runs, generator):
    first, _, _ = core_runs(spec())
    other = generator.generate(spec(seed=43))
    assert not np.array_equal(first.frames, other.frames)
    assert other.seed == 43


# ---------------------------------------------------------------------------------------------
# what the pipeline is asked to do
# ---------------------------------------------------------------------------------------------


def test_cfg_runs_only_when_guidance_above_one(spec, core_runs):
    _, with_cfg, _ = core_runs(spec(guidance_scale=4.0))
    _, without_cfg, _ = core_runs(spec(guidance_scale=1.0))
    assert with_cfg["transformer_calls"] == 2 * STEPS
    assert without_cfg["transformer_calls"] == STEPS
    # no negative prompt is encoded without CFG
    assert len(with_cfg["text_shapes"]) == 2
    assert len(without_cfg["text_shapes"]) == 1


def test_text_encoder_gets_exactly_512_tokens(spec, core_runs):
    _, record, _ = core_runs(spec())
    assert record["text_shapes"] and all(shape == (1, 512) for shape in record["text_shapes"])


def test_long_prompt_is_truncated_to_512_tokens(spec, core_runs):
    long = " ".join(["a cinematic shot of a runner on a beach"] * 200)  # far more than 512 tokens
    result, record, _ = core_runs(spec(prompt=long, guidance_scale=1.0))
    assert record["text_shapes"] == [(1, 512)]
    assert result.frames.shape == SHAPE


def test_progress_reports_each_stage_in_order_and_every_step(spec, core_runs):
    _, _, events = core_runs(spec())
    assert [(e.stage, e.step) for e in events] == [
        ("encoding_text", 0), ("encoding_image", 0), ("vae_encoding", 0),
        *[("denoising", step) for step in range(STEPS + 1)],
        ("vae_decoding", STEPS),  # the decode no longer hides under the last step
    ]
    assert {e.total_steps for e in events} == {STEPS}


def test_each_stage_is_announced_as_its_component_starts(spec, generator):
    """Each stage's event comes right before its component's first forward, and after the previous
    component's last one: a status read at any moment names the stage that is running."""
    components = {"encoding_text": "text_encoder", "encoding_image": "image_encoder",
                  "vae_encoding": "vae.encoder", "denoising": "transformer", "vae_decoding": "vae.decoder"}
    log: list[tuple[str, str]] = []
    hooks = []
    generator.encodings.clear()  # a kept first-frame encoding would skip the VAE encoder's forward
    for path in components.values():
        module = generator.pipe
        for part in path.split("."):
            module = getattr(module, part)
        # registered after the generator's own hooks, so they run after its announcement
        hooks.append(module.register_forward_pre_hook(lambda *_, p=path: log.append(("forward", p))))
    try:
        generator.generate(spec(seed=5), on_progress=lambda e: log.append(("progress", e.stage)))
    finally:
        for hook in hooks:
            hook.remove()
    # a component's forwards form one run, entered right after its stage's first event
    runs = [entry for i, entry in enumerate(log) if i == 0 or entry != log[i - 1]]
    called = [p for kind, p in log if kind == "forward"]
    assert [p for i, p in enumerate(called) if i == 0 or p != called[i - 1]] == list(components.values()), runs
    for stage, path in components.items():
        announced = runs.index(("progress", stage))
        assert runs[announced + 1] == ("forward", path), runs


def test_timings_cover_every_stage(spec, core_runs):
    result, _, _ = core_runs(spec())
    stages = {"text_encode", "image_encode", "vae_encode", "denoise", "vae_decode", "total"}
    assert stages <= set(result.timings)
    assert all(result.timings[k] > 0 for k in stages)
    parts = sum(result.timings[k] for k in stages - {"total"})
    assert parts <= result.timings["total"] + 1e-3


# ---------------------------------------------------------------------------------------------
# cancellation
# ---------------------------------------------------------------------------------------------


def test_cancel_after_first_step_then_next_run_is_unaffected(spec, core_runs, generator):
    fresh, _, _ = core_runs(spec())  # computed before the cancel
    polls, events = [], []

    def should_cancel():
        polls.append(len(polls) + 1)
        return True  # polled after step 1: stop there

    with recording(generator.pipe) as record, pytest.raises(Canceled) as info:
        generator.generate(spec(), on_progress=events.append, should_cancel=should_cancel)
    assert info.value.code == "CANCELED"
    assert info.value.details == {"step": 1}
    assert polls == [1]
    assert record["transformer_calls"] == 2  # one CFG step, then nothing more
    assert [e.step for e in events if e.stage == "denoising"] == [0, 1]

    after = generator.generate(spec())
    assert np.array_equal(after.frames, fresh.frames)


def test_should_cancel_false_runs_to_the_end(spec, core_runs, generator):
    fresh, _, _ = core_runs(spec(sampler="flowmatch_euler"))
    polls = []
    result = generator.generate(spec(sampler="flowmatch_euler"), should_cancel=lambda: polls.append(1) or False)
    assert len(polls) == STEPS
    assert np.array_equal(result.frames, fresh.frames)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def test_frames_to_uint8_rounds_like_numpy_to_pil():
    from diffusers.utils import numpy_to_pil

    values = np.array([0.0, 0.001, 0.0019, 0.002, 0.5, 0.998, 0.999, 1.0], dtype=np.float32)
    frames = np.stack([values] * 3, axis=-1)[None, None]  # (1 frame, 1 row, 8 columns, RGB)
    got = frames_to_uint8(frames)
    expected = np.asarray(numpy_to_pil(frames)[0])
    assert got.dtype == np.uint8
    assert np.array_equal(got[0], expected)
    assert got[0, 0, :, 0].tolist() == [0, 0, 0, 1, 128, 254, 255, 255]


def test_mp4_encoded_while_decoding_is_the_same_file_as_encoding_after(spec, generator):
    from deployments.engine.media_out import encode

    spec = spec(num_frames=9)  # three decoder chunks
    streamed = generator.generate(spec, stream_video=True)
    assert streamed.video is not None and streamed.timings["encode_video"] >= 0
    assert streamed.video == encode(streamed.frames, spec.fps, "mp4")  # the same bytes, frame for frame
    plain = generator.generate(spec)
    assert plain.video is None and np.array_equal(plain.frames, streamed.frames)
    webp = generator.generate(spec.model_copy(update={"output_format": "webp"}), stream_video=True)
    assert webp.video is None  # WebP is written whole, after the decode


def test_streamed_chunks_that_differ_from_the_output_fall_back_to_encoding_after(spec, generator, monkeypatch):
    from deployments.engine import pipeline

    real = pipeline.frames_to_uint8
    calls = []

    def off_by_one_in_the_hook(frames):
        calls.append(frames.shape)
        out = real(frames)
        if len(calls) == 1:  # the first decoder chunk only: the pipeline's own output stays right
            out = out.copy()
            out[0, 0, 0, 0] ^= 1
        return out

    monkeypatch.setattr(pipeline, "frames_to_uint8", off_by_one_in_the_hook)
    result = generator.generate(spec(num_frames=9), stream_video=True)
    assert len(calls) > 2 and result.video is None  # checked against the output, and given up


def test_the_readmes_python_sample_runs_as_written(model_cache, tmp_path, monkeypatch):
    """The README's "Generate from Python" block, with a real ctrl_img and the session's tiny checkpoint."""
    import base64
    import re
    from pathlib import Path

    from .conftest import png_bytes

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.search(r"^## Generate from Python.*?```python\n(.*?)```", readme, flags=re.S | re.M)
    assert section, "README section 'Generate from Python' with a python block"
    code = section.group(1)
    image = "data:image/png;base64," + base64.b64encode(png_bytes(make_image())).decode()
    for old, new in (('"data:image/png;base64,..."', repr(image)), ('"./outputs/models"', repr(str(model_cache)))):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"print": lambda *_: None})
    assert (tmp_path / "out.mp4").read_bytes()[4:8] == b"ftyp"
