"""The carried modules' loggers: the logging module outside the launcher, stderr inside it."""

from __future__ import annotations

import logging

import pytest

from enclavify import logs


@pytest.fixture
def launcher_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo to_stderr() after the test: it switches every carried module's logger."""
    monkeypatch.setattr(logs, "_stderr_level", [None])


def log_from_a_function(logger: logs.Logger) -> None:
    logger.warning("simulation evidence for %s", "api")


def test_records_go_to_the_logging_module_by_default(caplog: pytest.LogCaptureFixture) -> None:
    logger = logs.get_logger("enclavify.example")

    with caplog.at_level(logging.DEBUG, logger="enclavify.example"):
        log_from_a_function(logger)
        logger.debug("%d entries", 3)

    warning, debug = caplog.records
    assert (warning.name, warning.levelno) == ("enclavify.example", logging.WARNING)
    assert warning.getMessage() == "simulation evidence for api"
    # The record names the caller, not the logger's own method.
    assert warning.funcName == "log_from_a_function"
    assert debug.getMessage() == "3 entries"


@pytest.mark.usefixtures("launcher_logging")
def test_launcher_writes_records_at_its_level_to_stderr(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    logger = logs.get_logger("enclavify.attest.producers")
    logs.to_stderr("warning")

    with caplog.at_level(logging.DEBUG):
        logger.debug("not shown")
        logger.warning("INSECURE: %s", "no TEE found")

    assert capsys.readouterr().err == "WARNING enclavify.attest.producers: INSECURE: no TEE found\n"
    assert caplog.records == []

    logs.to_stderr("DEBUG")
    logger.debug("%d entries", 1750)
    assert capsys.readouterr().err == "DEBUG enclavify.attest.producers: 1750 entries\n"


@pytest.mark.usefixtures("launcher_logging")
def test_unknown_level_still_shows_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logs.get_logger("enclavify.runtime.launcher")
    logs.to_stderr("verbose")

    logger.debug("hidden")
    logger.warning("shown")

    assert capsys.readouterr().err == "WARNING enclavify.runtime.launcher: shown\n"


@pytest.mark.usefixtures("launcher_logging")
def test_logger_survives_bad_format(capsys: pytest.CaptureFixture[str]) -> None:
    logs.to_stderr("warning")

    logs.get_logger("x").warning("%d files", "many")

    assert capsys.readouterr().err == "WARNING x: %d files ('many',)\n"
