"""A pytest plugin for runs that may be killed (the GPU check's test stage): ``-p benchmarks.live_report
--live-out PREFIX [--test-timeout S]``.

After every test it appends the outcome (with the full traceback of a failure) to PREFIX.jsonl and rewrites
PREFIX.xml, a JUnit file of the tests finished so far, so a run cut short by the stage's time cap keeps
everything it learned (pytest's own --junitxml is written only at the end). ``--test-timeout`` bounds each
test's call with SIGALRM: a test that runs past it fails with a TimeoutError naming the limit, and the run goes
on (a kernel stuck inside one launch returns to Python only when the launch does; the stage's cap bounds that).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("live_report")
    group.addoption(
        "--live-out", default=None, help="path prefix of the .jsonl and .xml written after each test"
    )
    group.addoption("--test-timeout", type=float, default=0.0, help="seconds per test call (0: none)")


class _Live:
    def __init__(self, prefix: str):
        self.jsonl = Path(prefix + ".jsonl")
        self.xml = Path(prefix + ".xml")
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.jsonl.write_text("")
        self.cases: list[dict] = []
        self._write_xml()

    def add(self, rec: dict) -> None:
        self.cases.append(rec)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self._write_xml()

    def _write_xml(self) -> None:
        counts = {k: sum(c["outcome"] == k for c in self.cases) for k in ("failed", "error", "skipped")}
        lines = [
            '<?xml version="1.0" encoding="utf-8"?>',
            f'<testsuites><testsuite name="pytest" tests="{len(self.cases)}" failures="{counts["failed"]}" '
            f'errors="{counts["error"]}" skipped="{counts["skipped"]}">',
        ]
        for c in self.cases:
            classname, _, name = c["nodeid"].rpartition("::")
            attrs = f'classname={quoteattr(classname)} name={quoteattr(name)} time="{c["seconds"]:.3f}"'
            body = ""
            if c["outcome"] in ("failed", "error"):
                tag = "failure" if c["outcome"] == "failed" else "error"
                body = f"<{tag} message={quoteattr(c['message'][:200])}>{escape(c['longrepr'])}</{tag}>"
            elif c["outcome"] == "skipped":
                body = f"<skipped message={quoteattr(c['message'][:200])}/>"
            lines.append(f"<testcase {attrs}>{body}</testcase>")
        lines.append("</testsuite></testsuites>")
        tmp = self.xml.with_suffix(".xml.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.xml)


_live: _Live | None = None


def pytest_configure(config):
    global _live
    prefix = config.getoption("--live-out")
    _live = _Live(prefix) if prefix else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--test-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"test ran past --test-timeout={limit:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def pytest_runtest_logreport(report):
    if _live is None:
        return
    # one record per test: its call, or the setup / teardown phase that failed or skipped it
    if not (report.when == "call" or (report.when == "setup" and not report.passed) or report.failed):
        return
    if report.when != "call" and report.failed:
        outcome = "error"
    else:
        outcome = "skipped" if report.skipped else report.outcome
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    elif report.failed and report.longreprtext:
        message = report.longreprtext.strip().splitlines()[-1]
    _live.add(
        {
            "nodeid": report.nodeid,
            "outcome": outcome,
            "when": report.when,
            "seconds": report.duration,
            "message": message,
            "longrepr": report.longreprtext if report.failed else "",
            "at": time.time(),
        }
    )
