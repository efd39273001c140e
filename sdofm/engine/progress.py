"""Progress lines from the training workers."""

from __future__ import annotations

import logging
import sys


def say(message: str) -> None:
    """A progress line on the real stdout (Ray Train's print patch would log it twice)."""
    print(f"[sdofm] {message}", file=sys.__stdout__, flush=True)


class _QuietReports(logging.Filter):
    """Drops Ray Train's per-report INFO line (it repeats every metric of every rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Reporting training result")


def quiet_reports() -> None:
    """Install :class:`_QuietReports` on this worker's log handlers."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietReports())
