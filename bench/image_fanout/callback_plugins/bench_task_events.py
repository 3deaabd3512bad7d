"""Play and task start times for bench/image_fanout: appends one JSON line to
$BENCH_TASK_EVENTS when the playbook ends, {"events": [[kind, play, task, t], ...]}
with kind "play" | "task" | "end" and t from time.monotonic(). A task lasts from its
start to the next event (linear strategy: until every host is done with it)."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: bench_task_events
type: aggregate
short_description: play and task start times for bench/image_fanout
description: Writes every play's and task's start time to $BENCH_TASK_EVENTS (JSON line).
requirements: [enable in ANSIBLE_CALLBACKS_ENABLED]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bench_task_events"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._play = ""
        self._events: list[list[Any]] = []

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._play = play.get_name()
        self._events.append(["play", self._play, "", time.monotonic()])

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._events.append(["task", self._play, task.get_name(), time.monotonic()])

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self.v2_playbook_on_task_start(task, False)

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._events.append(["end", "", "", time.monotonic()])
        path = os.environ.get("BENCH_TASK_EVENTS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"events": self._events}) + "\n")
