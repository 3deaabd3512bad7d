"""Per-task wall time for bench/deploy --profile (ansible.posix's profile_tasks is not
installed here): the time from one task's start to the next's, summed by play/task
name, written as JSON lines to $PD_TASK_TIMES when the playbook ends."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: pd_task_times
type: aggregate
short_description: per-task wall time for bench/deploy
description: Writes each task's wall time (start to next start) to $PD_TASK_TIMES.
requirements: [enable in ANSIBLE_CALLBACKS_ENABLED]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "pd_task_times"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._play = ""
        self._current: str | None = None
        self._start = 0.0
        self._times: dict[str, float] = {}
        self._hosts: dict[str, int] = {}

    def _close(self) -> None:
        if self._current is not None:
            self._times[self._current] = (self._times.get(self._current, 0.0)
                                          + time.monotonic() - self._start)
            self._current = None

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._close()
        self._play = play.get_name()

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._close()
        self._current = f"{self._play} | {task.get_name()}"
        self._start = time.monotonic()

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self.v2_playbook_on_task_start(task, False)

    def _count(self, result: Any, *args: Any, **kwargs: Any) -> None:
        if self._current is not None:
            self._hosts[self._current] = self._hosts.get(self._current, 0) + 1

    v2_runner_on_ok = v2_runner_on_failed = v2_runner_on_skipped = _count
    v2_runner_on_unreachable = _count

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._close()
        path = os.environ.get("PD_TASK_TIMES")
        if not path:
            return
        with open(path, "a") as f:
            f.write(json.dumps({"tasks": self._times, "hosts": self._hosts}) + "\n")
