"""``python -m pytest_nsbox doctor [ROOTDIR]``."""

from __future__ import annotations

import sys

from pytest_nsbox import doctor


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "doctor" or len(argv) > 2:
        print("usage: python -m pytest_nsbox doctor [ROOTDIR]", file=sys.stderr)
        return 2
    return doctor.run(print, argv[1] if len(argv) == 2 else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
