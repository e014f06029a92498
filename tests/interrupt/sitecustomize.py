"""Ctrl-C at a chosen moment, for tests. With this folder on PYTHONPATH, a process whose
``WAND_TEST_INTERRUPT`` is ``MODULE`` sends itself SIGINT as it starts importing MODULE;
with ``MODULE:NAME.ATTR`` (``wand.client.connection:Client.wait_loaded``), the first time
that function is called, before it runs."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys

WHEN = os.environ.get("WAND_TEST_INTERRUPT", "")


def _interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt at the next bytecode, here


class _At(importlib.abc.MetaPathFinder):
    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        if not self.attr:
            _interrupt()
            return None
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            *owners, name = self.attr.split(".")
            owner = module
            for part in owners:
                owner = getattr(owner, part)
            original = getattr(owner, name)

            def interrupted(*args, **kwargs):
                _interrupt()
                return original(*args, **kwargs)

            setattr(owner, name, interrupted)

        spec.loader.exec_module = exec_module
        return spec


if WHEN:
    module, _, attr = WHEN.partition(":")
    sys.meta_path.insert(0, _At(module, attr))
