"""``python -m wand.run SCRIPT [ARGS…]`` (or ``-m MODULE`` / ``-c CODE``): run a script in the
warm client, with the libraries imported and the modules built (as ``wanctl run`` does)."""

import sys

from wand.client import launch


def main() -> int:
    try:
        return launch.main(sys.argv[1:])
    except launch.Unavailable as e:
        print(f"python -m wand.run: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
