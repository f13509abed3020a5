"""The command line of the contract tool (`python -m tools.npu_contract`, `make npu-contracts`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import __doc__ as package_doc
from . import acl_op_only
from .check import check_calls
from .contract import SNAPSHOT_NAME, diff_contracts, dump, extract_contract, load, snapshot, snapshot_path
from .releases import DEFAULT_VERSION, RELEASES, WheelUnavailable, fetch_wheel, pypi_releases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.npu_contract",
                                     description=package_doc.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--snapshot", metavar="PATH", help="write the pinned snapshot JSON")
    mode.add_argument("--check", metavar="PATH", help="regenerate from the wheel and diff with PATH")
    mode.add_argument("--calls", metavar="SRC", nargs="+", help="lint torch_npu/torch.npu calls")
    mode.add_argument("--refresh-all", metavar="DIR", help="write the snapshot of every release in RELEASES")
    mode.add_argument("--check-all", metavar="DIR", help="diff every committed snapshot with its wheel")
    mode.add_argument("--acl-op-only", metavar="DIR", help="write each release's capture deny-list (acl_op_only.py)")
    parser.add_argument("--pytorch-git", metavar="PATH", help="--acl-op-only: a clone of Ascend/pytorch")
    parser.add_argument("--op-plugin-git", metavar="PATH", help="--acl-op-only: a clone of Ascend/op-plugin")
    parser.add_argument("--contract", metavar="PATH", help="snapshot used by --calls (default: the wheel)")
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--wheel", help="use this wheel instead of downloading")
    args = parser.parse_args(argv)

    def from_wheel() -> dict:
        return snapshot(extract_contract(args.wheel or fetch_wheel(args.version)))

    if args.acl_op_only:
        if not (args.pytorch_git and args.op_plugin_git):
            parser.error("--acl-op-only needs --pytorch-git and --op-plugin-git")
        for path in acl_op_only.write_all(args.acl_op_only, RELEASES, args.pytorch_git, args.op_plugin_git):
            print(f"wrote {path}")
        return 0
    if args.refresh_all or args.check_all:
        return _all_releases(Path(args.refresh_all or args.check_all), write=bool(args.refresh_all))
    if args.snapshot:
        dump(from_wheel(), args.snapshot)
        print(f"wrote {args.snapshot}")
        return 0
    if args.check:
        diff = diff_contracts(load(args.check), from_wheel())
        print("\n".join(diff) if diff else f"{args.check} matches the wheel")
        return 1 if diff else 0
    contract = load(args.contract) if args.contract else extract_contract(args.wheel or fetch_wheel(args.version))
    stats: dict = {}
    violations = check_calls(args.calls, contract, stats)
    for v in violations:
        print(v)
    print(f"{stats['calls']} torch_npu/torch.npu call(s) in {stats['files']} file(s), "
          f"{len(violations)} violation(s)")
    return 1 if violations else 0


def _all_releases(directory: Path, write: bool) -> int:
    """--refresh-all / --check-all: every release of RELEASES, then PyPI's list for new ones."""
    failed = 0
    for version in RELEASES:
        path = snapshot_path(directory, version)
        fresh = snapshot(extract_contract(fetch_wheel(version)))
        if write:
            dump(fresh, path)
            print(f"wrote {path}")
            continue
        diff = diff_contracts(load(path), fresh) if path.is_file() else [f"{path} is missing"]
        print("\n".join(diff) if diff else f"{path} matches the wheel")
        failed += bool(diff)
    stale = sorted(set(p.name for p in directory.glob(SNAPSHOT_NAME.format(version="*")))
                   - {snapshot_path(directory, v).name for v in RELEASES})
    if stale:
        print(f"snapshots of releases not in RELEASES (remove them): {stale}")
        failed += 1
    try:
        new = [v for v in pypi_releases() if v not in RELEASES]
    except WheelUnavailable as exc:
        print(f"could not list PyPI's torch-npu releases: {str(exc).splitlines()[0]}")
    else:
        if new:
            print(f"torch-npu releases on PyPI that RELEASES does not list yet: {new} "
                  "(add them, run `make npu-contracts`, review ops/backends/npu_caps.py)")
            failed += 1
    return 1 if failed else 0
