"""``wan-serve``: run a config on this machine, build the tiny checkpoint, submit a job and download its
video, inspect the service.

Exit codes: 0 done; 1 the server refused the request or the job failed (its code and message are
printed); 2 bad usage; 130 interrupted (Ctrl-C cancels the submitted job on the server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import httpx

from .client import DEFAULT_MODEL, WanApiError, WanClient, build_request, parse_lora

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The README section whose examples use what ``wan-serve samples`` writes.
SAMPLES_README_SECTION = "Try it"


def _lora_arg(value: str) -> tuple[str, float]:
    try:
        return parse_lora(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-serve", description="Client and tools for the Wan 2.1 I2V service.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve run a config on a new local Ray with every port on 127.0.0.1")
    run.add_argument("config", help="Serve config file, e.g. configs/local.yaml")

    tiny = commands.add_parser("tiny-model", help="write the tiny test checkpoint (diffusers format)")
    tiny.add_argument("--out", required=True, type=Path, help="directory to write it to")

    samples = commands.add_parser(
        "samples", help="write a sample first frame and a sample LoRA for the local default (tiny model)")
    samples.add_argument("--out", type=Path, default=Path("."),
                         help="directory that wan-serve run runs in (default: the current one); writes "
                              "first_frame.png and loras/sample/sample.safetensors there")
    samples.add_argument("--force", action="store_true", help="replace files of the same names that differ")

    def server_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", default=os.environ.get("WAN_SERVER", "http://127.0.0.1:8000"),
                       help="service base URL (env WAN_SERVER; default %(default)s)")
        p.add_argument("--api-key", default=os.environ.get("WAN_API_KEY"),
                       help="API key sent as a Bearer token (env WAN_API_KEY)")
        p.add_argument("--http-timeout", type=float, default=60.0, help="seconds per HTTP call")

    submit = commands.add_parser("submit", help="submit one prompt, follow its progress, download the video")
    server_args(submit)
    submit.add_argument("--image", required=True, help="first frame: local file or http(s) URL")
    submit.add_argument("--prompt", required=True)
    submit.add_argument("--negative", help="negative prompt")
    submit.add_argument("--lora", action="append", default=[], type=_lora_arg, metavar="REF[:SCALE]",
                        help="LoRA path/URL with an optional multiplier (repeatable), e.g. job/job.safetensors:0.8")
    submit.add_argument("--trigger-word", help="replaces [trigger] in the prompt")
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--frames", type=int, help="number of frames (snapped to 4k+1)")
    submit.add_argument("--steps", type=int, help="denoising steps")
    submit.add_argument("--guidance", type=float, help="guidance scale")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--fps", type=int)
    submit.add_argument("--sampler", help="unipc or flowmatch_euler")
    submit.add_argument("--format", dest="output_format", help="mp4 or webp")
    submit.add_argument("--speed", help="exact (default), fast or turbo, where the server enables them")
    submit.add_argument("--model", default=DEFAULT_MODEL)
    submit.add_argument("--out", type=Path, help="where to write the video (default <request_id>.<format>)")
    submit.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    submit.add_argument("--poll", type=float, default=1.0,
                        help="seconds between status polls, where the server has no event stream")
    submit.add_argument("--timeout", type=float, help="give up waiting after this many seconds (job keeps running)")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")

    models = commands.add_parser("models", help="list the served models and their defaults")
    server_args(models)

    status = commands.add_parser("status", help="show a request's status")
    server_args(status)
    status.add_argument("request_id")

    cancel = commands.add_parser("cancel", help="cancel a request")
    server_args(cancel)
    cancel.add_argument("request_id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``wan-serve``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from .local_run import run  # imports Ray: only for this command

        return run(args.config)
    if args.command == "tiny-model":
        return _tiny_model(args)
    if args.command == "samples":
        return _samples(args)
    try:
        with WanClient(args.server, api_key=args.api_key, timeout=args.http_timeout) as client:
            if args.command == "submit":
                return _submit(client, args)
            if args.command == "models":
                return _print_json(client.models())
            if args.command == "status":
                return _print_json(client.status(args.request_id))
            if args.command == "cancel":
                return _print_json(client.cancel(args.request_id))
    except WanApiError as e:
        _error(f"{e.code}: {e.message}" + (f" {json.dumps(e.details)}" if e.details else ""))
        return EXIT_FAILED
    except httpx.HTTPError as e:
        _error(f"cannot reach {args.server}: {type(e).__name__}: {e}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    raise AssertionError(f"unhandled command {args.command}")  # argparse only lets known ones through


def _tiny_model(args: argparse.Namespace) -> int:
    from deployments.contract import build_tiny  # torch and diffusers, when called: only for this command

    print(build_tiny(args.out).resolve())
    return EXIT_OK


def _samples(args: argparse.Namespace) -> int:
    from .samples import LORA_REF, write_samples  # torch: only for this command

    written = write_samples(args.out, force=args.force)
    for what, w in written.items():
        if w.kept:
            _error(f"{w.path} exists and is not the sample: left as it is (--force replaces it)")
        else:
            print(w.path)
    print(f'next: a request with "ctrl_img" from {written["first_frame"].path} and "loras": [{{"path": "{LORA_REF}"}}]'
          f' (the curl and wan-serve submit examples in the README, section "{SAMPLES_README_SECTION}")',
          file=sys.stderr)
    return EXIT_OK


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request body ``wan-serve submit`` sends for these arguments."""
    return build_request(
        args.image, args.prompt, loras=args.lora, model=args.model,
        neg=args.negative, trigger_word=args.trigger_word, width=args.width, height=args.height,
        num_frames=args.frames, sample_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        fps=args.fps, sampler=args.sampler, output_format=args.output_format, speed=args.speed)


def _submit(client: WanClient, args: argparse.Namespace) -> int:
    try:
        request = request_from_args(args)
    except FileNotFoundError as e:
        _error(str(e))
        return EXIT_USAGE
    job = client.submit(request, idempotency_key=args.idempotency_key)
    request_id = job["request_id"]
    print(f"submitted {request_id}", file=sys.stderr)
    bar = _ProgressBar(disabled=args.quiet)
    try:
        result = client.wait(request_id, poll_s=args.poll, on_progress=bar.update, timeout=args.timeout)
    except KeyboardInterrupt:
        bar.close()
        _error(f"interrupted: canceling {request_id}")
        try:
            client.cancel(request_id)
        except (WanApiError, httpx.HTTPError) as e:
            _error(f"could not cancel {request_id}: {e}")
        return EXIT_INTERRUPTED
    except TimeoutError as e:
        bar.close()
        _error(f"{e}; follow it with: wan-serve status {request_id}")
        return EXIT_FAILED
    bar.close()
    if result["status"] != "succeeded":
        error = result.get("error") or {}
        _error(f"request {request_id} {result['status']}: {error.get('code', 'UNKNOWN')}: {error.get('message', '')}"
               + (f" {json.dumps(error['details'])}" if error.get("details") else ""))
        return EXIT_FAILED
    videos = result["outputs"]["videos"]
    for n, video in enumerate(videos):
        path = _output_path(args.out, request_id, video["format"], n, len(videos))
        print(client.download(request_id, n, path))
    return EXIT_OK


def _output_path(out: Path | None, request_id: str, fmt: str, n: int, count: int) -> Path:
    """``--out`` for a single video, ``<stem>-<n><suffix>`` for several; ``<request_id>.<format>`` by default."""
    if out is None:
        return Path(f"{request_id}.{fmt}" if count == 1 else f"{request_id}-{n}.{fmt}")
    return out if count == 1 else out.with_name(f"{out.stem}-{n}{out.suffix}")


# How the progress stages read on the terminal (unknown ones are shown as they come).
_STAGE_LABELS = {
    "queued": "queued",
    "loading_loras": "loading LoRAs",
    "encoding_text": "encoding the prompt",
    "encoding_image": "encoding the first frame",
    "vae_encoding": "VAE encoding the first frame",
    "vae_decoding": "VAE decoding the frames",
    "encoding_video": "encoding the video",
}


class _ProgressBar:
    """Progress of a job on stderr: a tqdm bar of denoising steps, one line for each other stage.

    The bar exists only while denoising, so its rate and ETA count steps alone: the encoders before
    and the VAE decode after (tens of seconds at real sizes) are lines of their own, never time
    hidden in a step.
    """

    def __init__(self, disabled: bool = False, file=None):
        self.disabled = disabled
        self.file = file if file is not None else sys.stderr
        self.bar = None
        self.shown = None  # (prompt_index, stage) last shown

    def update(self, status: dict[str, Any]) -> None:
        if self.disabled:
            return
        p = status.get("progress") or {}
        index, count = p.get("prompt_index", 0), p.get("num_prompts", 1)
        stage = p.get("stage") or "queued"
        if status.get("status") == "in_queue":
            stage = "queued"
        elif status.get("status") in ("succeeded", "failed", "canceled"):
            stage = status["status"]
        prefix = f"prompt {index + 1}/{count}" if count > 1 else ""
        if stage == "denoising" and status.get("status") == "in_progress":
            self._denoising(index, prefix, p.get("step", 0), p.get("total_steps") or None)
            return
        if self.bar is not None and self.shown == (index, "denoising") and p.get("step", 0) >= (self.bar.total or 0):
            self.bar.update(self.bar.total - self.bar.n)  # past the last step (which a poll may not have seen)
        self.close()
        if (index, stage) != self.shown:
            self.shown = (index, stage)
            label = _STAGE_LABELS.get(stage, stage.replace("_", " "))
            print(f"{prefix}: {label}" if prefix else label, file=self.file, flush=True)

    def _denoising(self, index: int, prefix: str, step: int, total: int | None) -> None:
        from tqdm import tqdm

        if self.bar is None or self.shown != (index, "denoising"):
            self.close()
            self.shown = (index, "denoising")
            # Started at the step first seen: tqdm's rate counts only the steps it watched.
            self.bar = tqdm(total=total, initial=step, unit="step", file=self.file, dynamic_ncols=True,
                            desc=f"{prefix} denoising" if prefix else "denoising")
            return
        if total and self.bar.total != total:
            self.bar.total = total
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_json(value: Any) -> int:
    print(json.dumps(value, indent=2))
    return EXIT_OK


def _error(message: str) -> None:
    print(f"wan-serve: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
