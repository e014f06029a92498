"""``wanctl``'s exit codes (the README lists them; scripts depend on them)."""

import sys

OK = 0  # done
ERROR = 1  # the daemon answered with an error, or the command failed
USAGE = 2  # a bad option or argument, refused before anything was done
UNREACHABLE = 3  # no daemon answered where wanctl looked (it says where)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), at any moment


def interrupted() -> int:
    """What wanctl says and returns on Ctrl-C."""
    print("wanctl: interrupted", file=sys.stderr)
    return INTERRUPTED
