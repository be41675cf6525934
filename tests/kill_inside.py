"""Run the real CLI with a SIGKILL planted at one exact place in the code: the windows a timed
kill almost never hits (between launching etcd and writing its pid file, between two renames).

    python -m tests.kill_inside '{"target": "etcdforge.services.local:atomic_write",
                                   "when": "before", "match": "etcd.pid"}' -- up -f c.yaml

The process SIGKILLs itself before, after, or `delay` seconds into (`during`) the `nth` call of
`target` whose arguments mention `match`. `target` is `module:attr` or `module:Class.attr`; for
a module-level function the patch reaches callers that look it up in that module, so name the
module that calls it (`etcdforge.services.local:atomic_write`, not `etcdforge.fsutil:...`).
Nothing in etcdforge knows about this: it only runs inside the test launcher.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Inside:
    """Where to die: see the module docstring."""

    target: str
    when: str = "before"  # before | after | during
    match: str = ""
    nth: int = 1
    delay: float = 0.05  # for `during`

    def describe(self) -> str:
        at = f"{self.delay:.2f} s into" if self.when == "during" else self.when
        which = f" call {self.nth}" if self.nth > 1 else ""
        match = f" on {self.match!r}" if self.match else ""
        return f"{at} {self.target}{which}{match}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)  # never reached: SIGKILL cannot be caught


def plant(inside: Inside) -> None:
    module_name, _, path = inside.target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attribute = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, attribute)
    calls = [0]

    def hit(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if inside.match and inside.match not in repr((args, kwargs)):
            return False
        calls[0] += 1
        return calls[0] == inside.nth

    def before(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        chosen = hit(args, kwargs)
        if chosen and inside.when == "before":
            die()
        if chosen and inside.when == "during":
            threading.Timer(inside.delay, die).start()
        return chosen and inside.when == "after"

    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(original):

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            after = before(args, kwargs)
            result = await original(*args, **kwargs)
            if after:
                die()
            return result

    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            after = before(args, kwargs)
            result = original(*args, **kwargs)
            if after:
                die()
            return result

    setattr(owner, attribute, functools.wraps(original)(wrapper))


def main() -> None:
    spec, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: python -m tests.kill_inside SPEC -- ARGS"
    plant(Inside(**json.loads(spec)))
    from etcdforge.cli import main as cli_main

    sys.argv = ["etcdforge", *args]
    cli_main()


if __name__ == "__main__":
    main()
