"""HTTP request -> generation specs (serve_app/normalize.py): the reference server's semantics,
row by row, and every limit with its code.

Expected values are written from the reference's rules (``reference-server.md``), not computed
with the helpers under test.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.errors import InvalidRequest, ServiceError
from serve_app.config import AppConfig
from serve_app.errors import http_status
from serve_app.normalize import to_specs
from serve_app.schemas import InferenceRequest

from .conftest import make_image, png_bytes

MODEL = "wan21_i2v_14b480p"
# The LoRA names below stand for files this module never writes: the ingress's look into the LoRA
# root (on by default) is off here, and tested on its own with roots of its own (LoRA section).
CFG = AppConfig(ingress={"lora_root_visible": False})
CTRL_RAW = png_bytes(make_image(64, 48, seed=21))
CTRL = base64.b64encode(CTRL_RAW).decode()


def request(prompts: list[dict] | None = None, **top) -> InferenceRequest:
    """A request whose prompts default to small sizes (so the image work stays cheap)."""
    if prompts is None:
        prompts = [{}]
    full = []
    for p in prompts:
        row = {"prompt": "a runner on a beach", "width": 64, "height": 48, "ctrl_img": CTRL}
        row.update(p)
        full.append({k: v for k, v in row.items() if v is not _OMIT})
    return InferenceRequest(**{"model": MODEL, "prompts": full, "loras": [], **top})


_OMIT = object()


def spec_of(cfg: AppConfig = CFG, **prompt):
    (spec,) = to_specs(request([prompt]), cfg)
    return spec


def api_error(req: InferenceRequest, cfg: AppConfig = CFG) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        to_specs(req, cfg)
    assert http_status(info.value) == 400
    return info.value


# ---------------------------------------------------------------------------------------------
# sizes, frames
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (850, 479, (848, 464)),
        (832, 480, (832, 480)),
        (64, 48, (64, 48)),
        (79, 63, (64, 48)),
        (95, 17, (80, 16)),
        (1295, 720, (1280, 720)),
        (480, 832, (480, 832)),
    ],
)
def test_sizes_floor_to_multiples_of_16(width, height, expected):
    spec = spec_of(width=width, height=height, num_frames=5, sample_steps=2)
    assert (spec.width, spec.height) == expected


@pytest.mark.parametrize(
    "frames, expected",
    [(40, 41), (42, 41), (44, 45), (41, 41), (1, 1), (2, 1), (4, 5), (5, 5), (80, 81), (81, 81), (83, 81)],
)
def test_frames_snap_to_4k_plus_1(frames, expected):
    assert spec_of(num_frames=frames, sample_steps=2).num_frames == expected


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------


def test_omitted_seed_is_42_plus_prompt_index():
    specs = to_specs(request([{}, {}, {"seed": 7}, {}]), CFG)
    assert [s.seed for s in specs] == [42, 43, 7, 45]


def test_seed_minus_one_is_resolved_to_a_random_seed():
    seeds = [spec_of(seed=-1).seed for _ in range(3)]
    assert all(s >= 0 for s in seeds)
    assert len(set(seeds)) > 1


@pytest.mark.parametrize("seed", [0, 1, 42, 123456789, 2**63 - 1])
def test_explicit_seed_is_kept(seed):
    assert spec_of(seed=seed).seed == seed


@pytest.mark.parametrize("seed", [-2, 2**63])
def test_seed_out_of_range_is_a_schema_error(seed):
    with pytest.raises(ValidationError):
        request([{"seed": seed}])


# ---------------------------------------------------------------------------------------------
# trigger words
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_word, request_word, expected",
    [
        (None, "sks", "sks walks; then sks waves"),
        ("ohwx", "sks", "ohwx walks; then ohwx waves"),
        ("ohwx", None, "ohwx walks; then ohwx waves"),
        (None, None, "[trigger] walks; then [trigger] waves"),
    ],
    ids=["request-word", "prompt-word-wins", "prompt-word-only", "no-word"],
)
def test_trigger_word(prompt_word, request_word, expected):
    prompt = {"prompt": "[trigger] walks; then [trigger] waves", "neg": "[trigger] blurry"}
    if prompt_word is not None:
        prompt["trigger_word"] = prompt_word
    top = {"trigger_word": request_word} if request_word is not None else {}
    (spec,) = to_specs(request([prompt], **top), CFG)
    assert spec.prompt == expected
    assert spec.negative_prompt == "[trigger] blurry"  # never in neg


def test_trigger_word_per_prompt():
    req = request([{"prompt": "[trigger] a"}, {"prompt": "[trigger] b", "trigger_word": "zz"}], trigger_word="sks")
    assert [s.prompt for s in to_specs(req, CFG)] == ["sks a", "zz b"]


def test_prompt_without_placeholder_is_unchanged():
    (spec,) = to_specs(request([{"prompt": "a trigger in [brackets]"}], trigger_word="sks"), CFG)
    assert spec.prompt == "a trigger in [brackets]"


# ---------------------------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------------------------


def test_defaults():
    (spec,) = to_specs(request([{"width": _OMIT, "height": _OMIT}]), CFG)
    assert (spec.width, spec.height) == (832, 480)
    assert spec.num_frames == 41
    assert spec.fps == 16
    assert spec.steps == 25
    assert spec.guidance_scale == 4.0
    assert spec.negative_prompt == ""
    assert spec.sampler == "unipc"
    assert spec.output_format == "mp4"
    assert spec.seed == 42
    assert spec.loras == ()
    assert Image.open(io.BytesIO(spec.image_png)).size == (832, 480)


def test_values_given_are_used():
    spec = spec_of(width=96, height=64, num_frames=9, fps=24, sample_steps=7, guidance_scale=1.0, neg="blurry",
                   seed=5, sampler="flowmatch_euler", output_format="webp")
    assert (spec.width, spec.height, spec.num_frames, spec.fps, spec.steps) == (96, 64, 9, 24, 7)
    assert (spec.guidance_scale, spec.negative_prompt, spec.seed) == (1.0, "blurry", 5)
    assert (spec.sampler, spec.output_format) == ("flowmatch_euler", "webp")


def test_request_level_sampler_and_format_apply_unless_the_prompt_sets_its_own():
    req = request([{}, {"sampler": "unipc", "output_format": "mp4"}], sampler="flowmatch_euler", output_format="webp")
    first, second = to_specs(req, CFG)
    assert (first.sampler, first.output_format) == ("flowmatch_euler", "webp")
    assert (second.sampler, second.output_format) == ("unipc", "mp4")


def test_choices_are_case_and_space_insensitive():
    spec = spec_of(sampler=" FlowMatch_Euler ", output_format="WEBP")
    assert (spec.sampler, spec.output_format) == ("flowmatch_euler", "webp")


def test_config_defaults_are_used():
    cfg = AppConfig(defaults={"width": 96, "height": 64, "num_frames": 9, "fps": 8, "sample_steps": 3,
                              "guidance_scale": 2.5, "negative_prompt": "ugly", "sampler": "flowmatch_euler",
                              "output_format": "webp", "base_seed": 1000})
    specs = to_specs(request([{"width": _OMIT, "height": _OMIT}, {"width": _OMIT, "height": _OMIT}]), cfg)
    assert [(s.width, s.height, s.num_frames, s.fps, s.steps, s.guidance_scale) for s in specs] == [
        (96, 64, 9, 8, 3, 2.5)
    ] * 2
    assert [(s.negative_prompt, s.sampler, s.output_format, s.seed) for s in specs] == [
        ("ugly", "flowmatch_euler", "webp", 1000),
        ("ugly", "flowmatch_euler", "webp", 1001),
    ]
    # A neg the client sends, even an empty one, is used as sent.
    (spec,) = to_specs(request([{"neg": ""}]), cfg)
    assert spec.negative_prompt == ""


# ---------------------------------------------------------------------------------------------
# the control image
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, size",
    [
        (make_image(64, 48, seed=21), (96, 160)),
        (make_image(64, 48, seed=22, mode="RGBA"), (80, 48)),
        (make_image(50, 70, seed=23, mode="L"), (64, 64)),
    ],
    ids=["rgb-stretched", "rgba-dropped-alpha", "grey-upscaled"],
)
def test_ctrl_image_is_rgb_stretched_to_exactly_width_by_height_with_lanczos(source, size):
    raw = png_bytes(source)
    spec = spec_of(width=size[0], height=size[1], ctrl_img=base64.b64encode(raw).decode())
    got = Image.open(io.BytesIO(spec.image_png))
    assert got.mode == "RGB" and got.size == size
    expected = Image.open(io.BytesIO(raw)).convert("RGB").resize(size, Image.LANCZOS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_ctrl_image_resized_to_the_snapped_size():
    spec = spec_of(width=100, height=70)
    assert Image.open(io.BytesIO(spec.image_png)).size == (96, 64)
    expected = Image.open(io.BytesIO(CTRL_RAW)).convert("RGB").resize((96, 64), Image.LANCZOS)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(spec.image_png))), np.asarray(expected))


def test_ctrl_image_as_data_uri():
    spec = spec_of(ctrl_img="data:image/png;base64," + CTRL)
    expected = Image.open(io.BytesIO(CTRL_RAW)).convert("RGB").resize((64, 48), Image.LANCZOS)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(spec.image_png))), np.asarray(expected))


def test_each_prompt_gets_its_own_image_and_index_in_errors():
    other = base64.b64encode(png_bytes(make_image(64, 48, seed=99))).decode()
    a, b = to_specs(request([{}, {"ctrl_img": other}]), CFG)
    assert a.image_png != b.image_png
    err = api_error(request([{}, {"ctrl_img": "!!"}]))
    assert err.code == "INVALID_BASE64" and err.details["prompt_index"] == 1


# ---------------------------------------------------------------------------------------------
# LoRAs
# ---------------------------------------------------------------------------------------------


def test_loras_become_refs():
    req = request(loras=[{"path": "job/a.safetensors", "network_multiplier": 0.5}, {"path": " b.safetensors "}])
    (spec,) = to_specs(req, CFG)
    assert [(l.ref, l.multiplier) for l in spec.loras] == [("job/a.safetensors", 0.5), ("b.safetensors", 1.0)]


def lora_error(req: InferenceRequest, cfg: AppConfig) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        to_specs(req, cfg)
    assert info.value.status == 400
    return info.value


def test_a_missing_lora_under_the_default_root_is_refused(tmp_path, monkeypatch):
    # The default config: the ingress sees ./loras as the replica does (one machine).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loras" / "job").mkdir(parents=True)
    (tmp_path / "loras" / "job" / "a.safetensors").write_bytes(b"")  # never read at submit
    cfg = AppConfig()
    (spec,) = to_specs(request(loras=[{"path": "job/a.safetensors"}]), cfg)
    assert spec.loras[0].ref == "job/a.safetensors"
    err = lora_error(request(loras=[{"path": "job/a.safetensors"}, {"path": "job/b.safetensors"}]), cfg)
    assert (err.code, err.details) == ("LORA_NOT_FOUND", {"ref": "job/b.safetensors"})


def test_the_root_check_follows_real_paths(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"")
    (root / "real.safetensors").write_bytes(b"")
    (root / "alias.safetensors").symlink_to(root / "real.safetensors")
    (root / "escape.safetensors").symlink_to(outside / "x.safetensors")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "not-a-file.safetensors").mkdir()
    (root / "x.bin").write_bytes(b"")
    (root / "bin-link.safetensors").symlink_to(root / "x.bin")
    cfg = AppConfig(gpu={"lora": {"root": str(root)}})
    (spec,) = to_specs(request(loras=[{"path": "alias.safetensors"}]), cfg)
    assert spec.loras[0].ref == "alias.safetensors"
    for ref, code in [("escape.safetensors", "LORA_REF_INVALID"), ("linkdir/x.safetensors", "LORA_REF_INVALID"),
                      ("bin-link.safetensors", "LORA_REF_INVALID"), ("not-a-file.safetensors", "LORA_NOT_FOUND"),
                      ("nothing/here.safetensors", "LORA_NOT_FOUND")]:
        assert lora_error(request(loras=[{"path": ref}]), cfg).code == code, ref


def test_where_the_ingress_cannot_see_the_root_only_the_syntax_is_checked(tmp_path):
    cfg = AppConfig(gpu={"lora": {"root": str(tmp_path)}}, ingress={"lora_root_visible": False})
    (spec,) = to_specs(request(loras=[{"path": "job/missing.safetensors"}]), cfg)
    assert spec.loras[0].ref == "job/missing.safetensors"
    assert lora_error(request(loras=[{"path": "../x.safetensors"}]), cfg).code == "LORA_REF_INVALID"


def test_urls_and_malformed_lists_are_not_looked_up_in_the_root(tmp_path):
    cfg = AppConfig(gpu={"lora": {"root": str(tmp_path)}})  # an empty root the ingress sees
    # A URL is fetched on the GPU node, never looked for under the root.
    (spec,) = to_specs(request(loras=[{"path": "https://example.com/x.safetensors"}]), cfg)
    assert spec.loras[0].ref == "https://example.com/x.safetensors"
    # A malformed list is refused for what it is, before the disk is looked at.
    dup = request(loras=[{"path": "m.safetensors"}, {"path": "m.safetensors"}])
    assert api_error(dup, cfg).code == "DUPLICATE_LORA"
    bad = request(loras=[{"path": "m.safetensors"}, {"path": "../x.safetensors"}])
    assert lora_error(bad, cfg).code == "LORA_REF_INVALID"


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def _loras(n: int) -> list[dict]:
    return [{"path": f"lora_{i}.safetensors"} for i in range(n)]


@pytest.mark.parametrize(
    "req, code",
    [
        (lambda: request([{"sampler": "ddim"}]), "SAMPLER_NOT_SUPPORTED"),
        (lambda: request(sampler="euler_a"), "SAMPLER_NOT_SUPPORTED"),
        (lambda: request([{"output_format": "gif"}]), "OUTPUT_FORMAT_NOT_SUPPORTED"),
        (lambda: request(output_format="mov"), "OUTPUT_FORMAT_NOT_SUPPORTED"),
        (lambda: InferenceRequest(model="wan22_14b_i2v", prompts=[{"prompt": "x", "ctrl_img": CTRL}]),
         "MODEL_NOT_FOUND"),
        (lambda: request([{"ctrl_img": _OMIT}]), "CONTROL_IMAGE_REQUIRED"),
        (lambda: request([{"ctrl_img": ""}]), "CONTROL_IMAGE_REQUIRED"),
        (lambda: request(loras=_loras(5)), "TOO_MANY_LORAS"),
        (lambda: request(loras=[{"path": "a.safetensors", "transformer": "low"}]), "MOE_FORMAT_NOT_SUPPORTED"),
        (lambda: request(loras=[{"path": "a.safetensors", "transformer": "high"}]), "MOE_FORMAT_NOT_SUPPORTED"),
        (lambda: request(loras=[{"path": "a.safetensors"}, {"path": "a.safetensors", "network_multiplier": 0.5}]),
         "DUPLICATE_LORA"),
        (lambda: request(loras=[{"path": "a.safetensors"}, {"path": " a.safetensors"}]), "DUPLICATE_LORA"),
        (lambda: request([{"width": 1296, "height": 720}]), "SIZE_OUT_OF_RANGE"),
        (lambda: request([{"width": 720, "height": 1296}]), "SIZE_OUT_OF_RANGE"),
        (lambda: request([{"num_frames": 85}]), "FRAMES_OUT_OF_RANGE"),
        (lambda: request([{"sample_steps": 101}]), "STEPS_OUT_OF_RANGE"),
        (lambda: request([{"width": 832, "height": 480, "num_frames": 81, "sample_steps": 51}]), "WORK_TOO_LARGE"),
        (lambda: request([{}] * 9), "TOO_MANY_PROMPTS"),
        (lambda: request([{"prompt": "x" * 4001}]), "PROMPT_TOO_LONG"),
        (lambda: request([{"neg": "x" * 4001}]), "PROMPT_TOO_LONG"),
    ],
    ids=[
        "sampler", "sampler-request-level", "format", "format-request-level", "model", "no-ctrl-img",
        "empty-ctrl-img", "five-loras", "moe-low", "moe-high", "duplicate-lora", "duplicate-lora-spaces",
        "too-wide", "too-tall", "frames", "steps", "work", "prompts", "prompt-length", "neg-length",
    ],
)
def test_errors(req, code):
    assert api_error(req()).code == code


@pytest.mark.parametrize(
    "prompt",
    [
        {"width": 1280, "height": 720, "num_frames": 5, "sample_steps": 2},
        {"width": 1295, "height": 720, "num_frames": 5, "sample_steps": 2},  # snaps to 1280 first
        {"num_frames": 82, "sample_steps": 2},  # snaps to 81
        {"num_frames": 5, "sample_steps": 100},
        {"width": 832, "height": 480, "num_frames": 81, "sample_steps": 50},  # max_work exactly
        {"prompt": "x" * 4000, "neg": "y" * 4000},
        {"width": 16, "height": 16},
    ],
    ids=["long-side", "long-side-snapped", "frames-snapped", "steps", "work", "prompt-length", "smallest"],
)
def test_limits_are_inclusive(prompt):
    (spec,) = to_specs(request([prompt]), CFG)
    assert spec.width <= 1280 and spec.num_frames <= 81 and spec.steps <= 100


def test_four_loras_and_eight_prompts_are_accepted():
    specs = to_specs(request([{}] * 8, loras=_loras(4)), CFG)
    assert len(specs) == 8 and all(len(s.loras) == 4 for s in specs)


def test_limits_come_from_the_config():
    cfg = AppConfig(limits={"max_prompts": 1, "max_frames": 9, "max_loras": 1, "max_long_side": 64},
                    ingress=CFG.ingress)
    assert api_error(request([{}, {}]), cfg).code == "TOO_MANY_PROMPTS"
    assert api_error(request([{"num_frames": 13}]), cfg).code == "FRAMES_OUT_OF_RANGE"
    assert api_error(request([{"num_frames": 5}], loras=_loras(2)), cfg).code == "TOO_MANY_LORAS"
    assert api_error(request([{"width": 80, "num_frames": 5}]), cfg).code == "SIZE_OUT_OF_RANGE"
    assert len(to_specs(request([{"num_frames": 9}], loras=_loras(1)), cfg)) == 1


def test_sizes_a_multi_gpu_replica_cannot_split_are_refused_at_submit():
    # 48x80, 1 frame: 3 x 5 x 1 = 15 tokens, which 2 sequence-parallel GPUs cannot share evenly.
    odd = request([{"width": 80, "height": 48, "num_frames": 1}])
    assert len(to_specs(odd, CFG)) == 1  # one GPU per request: any size
    cfg = AppConfig(gpu={"parallel": {"degree": 2, "ulysses_degree": 2}}, ingress=CFG.ingress)
    err = api_error(odd, cfg)
    assert err.code == "SIZE_NOT_SPLITTABLE" and "15 tokens" in err.message
    assert err.details["sequence_degree"] == 2 and err.details["prompt_index"] == 0
    cfg_only = AppConfig(gpu={"parallel": {"degree": 2}}, ingress=CFG.ingress)  # CFG-parallel splits no tokens
    assert len(to_specs(odd, cfg_only)) == 1
    assert len(to_specs(request([{"width": 64, "height": 48, "num_frames": 5}]), cfg)) == 1  # 24 tokens


def test_limit_error_carries_details():
    err = api_error(request([{}, {"num_frames": 85}]))
    assert err.details["prompt_index"] == 1
    assert err.details["value"] == 85 and err.details["limit"] == 81


# ---------------------------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["guidance_scale", "network_multiplier"])
def test_nan_and_inf_are_rejected(where, value):
    with pytest.raises(ValidationError):
        if where == "guidance_scale":
            request([{"guidance_scale": value}])
        else:
            request(loras=[{"path": "a.safetensors", "network_multiplier": value}])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_inf_in_json_are_rejected(literal):
    body = (
        '{"model": "%s", "prompts": [{"prompt": "x", "ctrl_img": "%s", "guidance_scale": %s}]}'
        % (MODEL, CTRL, literal)
    )
    with pytest.raises(ValidationError):
        InferenceRequest.model_validate_json(body)


def test_unknown_fields_are_ignored():
    req = InferenceRequest.model_validate(
        {
            "model": MODEL,
            "prompts": [{"prompt": "x", "ctrl_img": CTRL, "width": 64, "height": 48, "cfg_rescale": 0.7}],
            "loras": [{"path": "a.safetensors", "lora_scale": 3}],
            "callback_url": "https://example.com",
        }
    )
    dumped = req.model_dump()
    assert "callback_url" not in dumped
    assert "cfg_rescale" not in dumped["prompts"][0]
    assert "lora_scale" not in dumped["loras"][0]
    (spec,) = to_specs(req, CFG)
    assert spec.prompt == "x"


@pytest.mark.parametrize(
    "prompt",
    [{"width": 8}, {"height": 5000}, {"num_frames": 0}, {"fps": 0}, {"sample_steps": 0},
     {"guidance_scale": -0.5}, {"guidance_scale": 20.5}],
)
def test_schema_ranges(prompt):
    with pytest.raises(ValidationError):
        request([prompt])


def test_multiplier_range():
    with pytest.raises(ValidationError):
        request(loras=[{"path": "a.safetensors", "network_multiplier": 2.5}])
    (spec,) = to_specs(request(loras=[{"path": "a.safetensors", "network_multiplier": -2.0}]), CFG)
    assert spec.loras[0].multiplier == -2.0


def test_spec_round_trips_through_json():
    spec = spec_of(seed=-1, trigger_word="sks", prompt="[trigger] x")
    assert type(spec).model_validate_json(spec.model_dump_json()) == spec


# ---------------------------------------------------------------------------------------------
# speed modes
# ---------------------------------------------------------------------------------------------

TURBO_CFG = AppConfig(ingress={"lora_root_visible": False},
                      gpu={"model": {"speed": {"turbo": {"enabled": True, "lora": "/x/distill.safetensors"}}}})


def test_speed_defaults_to_exact_and_a_prompt_overrides_the_request():
    assert spec_of().speed == "exact"
    specs = to_specs(request([{}, {"speed": "exact"}, {"speed": " Fast "}], speed="fast"), CFG)
    assert [s.speed for s in specs] == ["fast", "exact", "fast"]
    # the steps and guidance of exact and fast are the request's
    assert (specs[0].steps, specs[0].guidance_scale) == (25, 4.0)


def test_turbo_runs_the_distillation_steps_without_cfg_whatever_was_asked():
    specs = to_specs(request([{"sample_steps": 40, "guidance_scale": 6.0}, {"speed": "exact", "sample_steps": 40}],
                             speed="turbo"), TURBO_CFG)
    assert [(s.speed, s.steps, s.guidance_scale) for s in specs] == [("turbo", 4, 1.0), ("exact", 40, 4.0)]
    # the work limit counts the steps that run: 100 asked steps are over the limit, 4 are not
    assert to_specs(request([{"speed": "turbo", "sample_steps": 100, "width": 832, "height": 480,
                              "num_frames": 81}]), TURBO_CFG)[0].steps == 4


@pytest.mark.parametrize("value, why", [("turbo", "not enabled"), ("ludicrous", "unknown"), ("EXACTLY", "unknown")])
def test_unknown_and_disabled_speed_modes_are_refused(value, why):
    for req in (request([{"speed": value}]), request(speed=value)):
        err = api_error(req)
        assert err.code == "SPEED_MODE_NOT_SUPPORTED" and why in err.message
        assert err.details == {"prompt_index": 0, "allowed": ["exact", "fast"]}
    no_fast = AppConfig(ingress={"lora_root_visible": False}, gpu={"model": {"speed": {"fast": {"enabled": False}}}})
    assert api_error(request(speed="fast"), no_fast).details["allowed"] == ["exact"]


def test_the_default_speed_must_be_an_enabled_mode():
    assert AppConfig(defaults={"speed": "fast"}).defaults.speed == "fast"
    with pytest.raises(ValidationError, match="not an enabled speed mode"):
        AppConfig(defaults={"speed": "turbo"})
    with pytest.raises(ValidationError, match="needs speed.turbo.lora"):
        AppConfig(gpu={"model": {"speed": {"turbo": {"enabled": True}}}})
