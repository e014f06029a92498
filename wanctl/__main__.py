"""``python -m wanctl`` and the ``wanctl`` command. Ctrl-C at any moment, even while the
command's modules are still being imported, is one line and exit status 130: so this
module imports nothing of wanctl's before it can catch it."""

import sys


def run() -> int:
    try:
        from wanctl.cli import main

        return main()
    except KeyboardInterrupt:
        from wanctl import exits

        return exits.interrupted()


if __name__ == "__main__":
    sys.exit(run())
