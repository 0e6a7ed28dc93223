"""`nanoseek <stage> ...`: thin dispatch to nanoseek.stages.<stage>.main(argv)."""

import importlib
import pkgutil
import sys

from . import stages


def _stage_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(stages.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = _stage_names()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nanoseek <stage> [options]   (nanoseek <stage> --help for its options)\n")
        print("stages: " + ", ".join(names))
        return 0
    name = argv[0].replace("-", "_")
    if name not in names:
        print(f"nanoseek: unknown stage {argv[0]!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"nanoseek.stages.{name}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
