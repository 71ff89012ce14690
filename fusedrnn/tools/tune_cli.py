"""`fusedrnn tune --show | --clear`: list or clear the tuning cache of backend="auto" (fusedrnn.tune).

Wired into the `fusedrnn` command by fusedrnn/tools/cli.py:

    tune_cli.add_parser(subparsers)                      # in build_parser
    if args.command == "tune": return tune_cli.cmd_tune(args)   # in main, before any device setup

Runs nothing on a device and imports neither Triton nor the kernels.
"""
from __future__ import annotations

import json


def add_parser(subparsers):
    """Add the `tune` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "tune", help="list or clear the tuning cache of backend='auto'",
        description="backend='auto' on CUDA times cuDNN against fusedrnn's kernels for each layer "
                    "shape and caches the fastest that agreed, in $FUSEDRNN_CACHE_DIR (default "
                    "~/.cache/fusedrnn). --show lists the cached decisions, --clear removes them.")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--show", action="store_true", help="list the cached decisions")
    action.add_argument("--clear", action="store_true", help="remove every cached decision")
    p.add_argument("--json", action="store_true", help="with --show: print the entries as JSON")
    return p


def cmd_tune(args, out=None):
    """Run `fusedrnn tune`; returns the exit status. `out` (default stdout) receives the text."""
    import sys

    from .. import tune

    out = out or sys.stdout
    tuner = tune.get_tuner()
    path = tuner.cache.path
    if args.clear:
        n = tune.clear_cache(tuner)
        print(f"fusedrnn tune: removed {n} cached decision{'s' if n != 1 else ''} ({path})", file=out)
        return 0
    if getattr(args, "json", False):
        entries = [{"key": k.to_dict(), "decision": d.to_dict()} for k, d in tuner.cache.entries()]
        print(json.dumps({"path": path, "entries": entries}, indent=1), file=out)
        return 0
    rows = tune.show_cache(tuner)
    if not rows:
        print(f"fusedrnn tune: no cached decisions ({path})", file=out)
        return 0
    print(f"fusedrnn tune: {len(rows)} cached decision{'s' if len(rows) != 1 else ''} ({path})",
          file=out)
    print(_table(tune.SHOW_HEADER, rows), file=out)
    return 0


def _table(header, rows):
    """Left-aligned plain-text columns (kept here: the tools' table helpers are being moved)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths))]
                     + [line.format(*map(str, r)).rstrip() for r in rows])
