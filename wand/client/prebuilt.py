"""Modules built ahead of need, for the process that will use them.

The warm client (:mod:`wand.client.warm`) builds every resident component's module before it
forks a script, and puts it here under its slab's token; in the forked script,
:meth:`wand.client.connection.Client.module` takes it instead of building it again (once: a
second ``module()`` of the same component builds a new one, as in any process). A CPU
component's module is bound to a mapping the script inherited, so it is valid there exactly
as in the warm process; a GPU component's is a skeleton, which the script binds to the
mapping it makes. Nothing here is shared between processes: each script has its own copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_modules: dict[str, torch.nn.Module] = {}  # slab token → module bound to this process's mapping
_skeletons: dict[str, torch.nn.Module] = {}  # slab token → skeleton of a GPU slab's module
# How a launcher started this process (``wanctl run``): its timings, and when the warm client
# forked it. Empty in a process started the ordinary way.
launched: dict[str, float] = {}


def put(token: str, module: torch.nn.Module) -> None:
    _modules[token] = module


def take(token: str) -> torch.nn.Module | None:
    """The module built for slab ``token``, handed out once."""
    return _modules.pop(token, None)


def put_skeleton(token: str, module: torch.nn.Module) -> None:
    """The skeleton of a GPU slab's module: a script maps the slab itself (CUDA cannot be
    initialised before a fork) and binds it to this."""
    _skeletons[token] = module


def take_skeleton(token: str) -> torch.nn.Module | None:
    return _skeletons.pop(token, None)


def tokens() -> set[str]:
    return set(_modules) | set(_skeletons)


def drop(token: str) -> None:
    _modules.pop(token, None)
    _skeletons.pop(token, None)
