"""The Firecracker log line format, levels, destinations (file, FIFO) and PUT /logger."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from controlplane import logger as fclog
from controlplane.logger import FcLogger, LineSink, SinkError
from tests.support.api_client import assert_no_content, fault

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9} \[(?P<tag>[^\]]+)\] (?P<msg>.*)$")


@pytest.fixture
def logger():
    instance = FcLogger()
    yield instance
    instance.close()


def lines(path: Path) -> list[re.Match[str]]:
    matches = [LINE.match(line) for line in path.read_text().splitlines()]
    assert all(matches), path.read_text()
    return matches  # type: ignore[return-value]


def test_line_format_is_firecrackers(tmp_path: Path, logger: FcLogger):
    path = tmp_path / "log"
    logger.set_instance_id("vm-42")
    logger.configure(str(path), "Info")
    fclog.get("vmm").info("Running %s", "embervm")
    fclog.get("api").info("API server started.")
    got = [(m["tag"], m["msg"]) for m in lines(path)]
    assert got == [("vm-42:main", "Running embervm"), ("vm-42:fc_api", "API server started.")]


def test_show_level_and_origin(tmp_path: Path, logger: FcLogger):
    path = tmp_path / "log"
    logger.configure(str(path), "Debug", show_level=True, show_log_origin=True)
    fclog.get("vmm").warning("careful")
    line_no = 1 + _line_of("careful")
    [match] = lines(path)
    assert match["tag"] == f"anonymous-instance:main:WARN:tests/unit/controlplane/test_logger.py:{line_no}"


def _line_of(text: str) -> int:
    source = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(source) if f'warning("{text}")' in line)


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("Error", ["ERROR"]),
        ("Warning", ["ERROR", "WARN"]),
        ("Info", ["ERROR", "WARN", "INFO"]),
        ("Debug", ["ERROR", "WARN", "INFO", "DEBUG"]),
        ("Trace", ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]),
        ("Off", []),
    ],
)
def test_levels_filter(tmp_path: Path, logger: FcLogger, level: str, shown: list[str]):
    path = tmp_path / "log"
    logger.configure(str(path), level, show_level=True)
    log = fclog.get("vmm")
    log.error("e")
    log.warning("w")
    log.info("i")
    log.debug("d")
    log.log(fclog.TRACE, "t")
    assert [m["tag"].split(":")[-1] for m in lines(path)] == shown


def test_module_filter_keeps_one_module(tmp_path: Path, logger: FcLogger):
    path = tmp_path / "log"
    logger.configure(str(path), "Info", module="embervm::api")
    fclog.get("vmm").info("not this")
    fclog.get("api").info("this")
    assert [m["msg"] for m in lines(path)] == ["this"]


def test_fifo_destination_is_line_flushed(tmp_path: Path, logger: FcLogger):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        logger.configure(str(fifo), "Info")
        fclog.get("vmm").info("through the pipe")
        data = os.read(reader, 4096).decode()
    finally:
        os.close(reader)
    assert data.endswith("] through the pipe\n")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_fifo_nobody_reads_never_blocks_and_counts_missed_lines(tmp_path: Path, logger: FcLogger):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    missed = []
    logger.on_miss = lambda: missed.append(1)
    logger.configure(str(fifo), "Info")
    for _ in range(2000):  # far more than a pipe buffer holds
        fclog.get("vmm").info("x" * 100)
    assert missed, "a full pipe should drop lines, not block"


def test_unopenable_destination_is_an_error(tmp_path: Path):
    with pytest.raises(SinkError):
        LineSink(str(tmp_path / "missing-dir" / "log"))


def test_put_logger_points_the_api_log_at_a_file(api, tmp_path: Path):
    path = tmp_path / "api.log"
    body = {"log_path": str(path), "level": "debug", "show_level": True, "show_log_origin": False}
    assert_no_content(api.client.put("/logger", json=body))
    api.client.get("/machine-config")
    text = path.read_text()
    assert ':fc_api:INFO] The API server received a Get request on "/machine-config".' in text
    assert api.client.get("/vm/config").json()["logger"] == {**body, "level": "Debug", "module": None}


def test_put_logger_errors(api, tmp_path: Path):
    bad_path = {"log_path": str(tmp_path / "no" / "dir.log")}
    assert fault(api.client.put("/logger", json=bad_path)).startswith("Logger error: Failed to open target file:")
    assert "Invalid LevelFilter" in fault(api.client.put("/logger", json={"level": "Loud"}))
    assert api.metrics.snapshot()["put_api_requests"]["logger_fails"] == 2


def test_put_logger_takes_warn_as_firecracker_does(api):
    assert_no_content(api.client.put("/logger", json={"level": "warn"}))
    assert api.client.get("/vm/config").json()["logger"]["level"] == "Warning"
