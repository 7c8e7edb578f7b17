"""The replica's log policy (deployments/replica/logs.py) on Serve's logger: client errors as one warning line."""

from __future__ import annotations

import io
import logging

import pytest

from deployments.errors import GenerationFailed, LoraIncompatible, LoraNotFound
from deployments.joblog import JOB_ID
from deployments.replica.logs import ClientErrorsAsWarnings, said


@pytest.fixture
def logged():
    """A logger with the filter, and what its handler wrote."""
    logger = logging.getLogger(f"test-logs-{id(object())}")
    logger.propagate = False
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.addFilter(ClientErrorsAsWarnings())
    yield logger, out
    logger.removeHandler(handler)


def test_a_client_error_is_one_warning_line_however_often_it_is_logged(logged):
    logger, out = logged
    try:
        raise LoraNotFound("LoRA file not found: x.safetensors", {"ref": "x.safetensors"})
    except LoraNotFound as e:
        logger.error("Failed to load model 'loras:[...]'. Error: %s", e)  # as Serve's multiplexer logs it
        logger.exception("Request failed.")  # as Serve's replica wrapper logs it
    assert out.getvalue() == "WARNING request failed (client error): LORA_NOT_FOUND: LoRA file not found: x.safetensors\n"


def test_each_client_error_gets_its_line(logged):
    logger, out = logged
    for exc in (LoraIncompatible("keys do not match"), LoraIncompatible("keys do not match")):
        try:
            raise exc
        except LoraIncompatible:
            logger.exception("Request failed.")
    assert out.getvalue().count("WARNING request failed (client error): LORA_INCOMPATIBLE") == 2


def test_a_fault_keeps_its_error_and_traceback(logged):
    logger, out = logged
    try:
        raise GenerationFailed("generating failed: RuntimeError: boom")
    except GenerationFailed:
        logger.exception("Request failed.")
    text = out.getvalue()
    assert text.startswith("ERROR Request failed.\nTraceback") and "GenerationFailed" in text


def test_inside_a_generation_serve_records_about_a_client_error_are_dropped(logged):
    """The generation's handler logs the failure once with the job id; Serve's lines would repeat it."""
    logger, out = logged
    token = JOB_ID.set("job-1")
    try:
        for exc in (LoraNotFound("missing"), GenerationFailed("generating failed: boom")):
            try:
                raise exc
            except Exception:
                logger.error("Failed to load model. Error: %s", exc)
                logger.exception("Request failed.")
    finally:
        JOB_ID.reset(token)
    text = out.getvalue()
    assert "LORA_NOT_FOUND" not in text and "missing" not in text, text
    assert text.startswith("ERROR Failed to load model. Error: generating failed: boom\n") and "Traceback" in text


def test_an_error_the_generation_said_is_not_repeated_by_serve(logged):
    """Serve logs "Request failed." outside the generation's context: the mark is what stops it."""
    logger, out = logged
    exc = LoraNotFound("missing")
    said(exc)
    try:
        raise exc
    except LoraNotFound:
        logger.exception("Request failed.")
    assert out.getvalue() == ""


def test_records_about_nothing_or_below_error_pass_unchanged(logged):
    logger, out = logged
    logger.error("plain error")
    try:
        raise LoraNotFound("missing")
    except LoraNotFound:
        logger.warning("a warning while handling it")
    assert out.getvalue() == "ERROR plain error\nWARNING a warning while handling it\n"
