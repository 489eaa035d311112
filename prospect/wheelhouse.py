"""An offline wheelhouse for machines without network (air-gapped GPU nodes).

    python -m prospect.wheelhouse DEST [--python-version 3.12] [--skip torch ...] [--only NAME ...]
        [--have FREEZE.txt]

downloads, on a machine with network, binary wheels of prospect's dependencies, pinned to the versions
installed here (the ones the tests ran with), for the target's Python and manylinux x86-64. By default
every distribution prospect needs (its requirements, recursively, as installed here) except torch and
its CUDA libraries, which the target brings. `--have` takes the target's `pip freeze` output: packages
it already has at a version prospect accepts are skipped. On the target:

    pip install --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DEFAULT_SKIP = ("torch", "triton", "setuptools", "pip")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def installed_closure(root: str = "prospect", extras: tuple[str, ...] = ("offline",)) -> dict[str, str]:
    """{canonical name: installed version} of everything `root` (with `extras`) needs, recursively."""
    seen: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted_extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = canonicalize_name(dist.metadata["Name"])
        if key in seen and not wanted_extras:
            continue
        seen[key] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            environment = [{"extra": extra} for extra in wanted_extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environment):
                todo.append((requirement.name, tuple(requirement.extras)))
    seen.pop(canonicalize_name(root), None)
    return seen


def requirement_specs(root: str = "prospect") -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(t).name): Requirement(t) for t in metadata.distribution(root).requires or []}


def target_versions(freeze: Path) -> dict[str, str]:
    versions = {}
    for line in freeze.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if match:
            versions[canonicalize_name(match.group(1))] = match.group(2)
    return versions


def choose_wheels(
    closure: dict[str, str], specs: dict[str, Requirement], have: dict[str, str], skip: set[str], wanted: set[str]
) -> list[str]:
    """`name==version` pins to download: wanted, not skipped, and not already on the target at an accepted version."""
    chosen = []
    for name in sorted(wanted):
        if name in skip or name.startswith("nvidia-"):
            continue
        if name in have and (name not in specs or specs[name].specifier.contains(have[name], prereleases=True)):
            continue
        chosen.append(f"{name}=={closure[name]}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prospect.wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP), help="distributions the target brings")
    parser.add_argument("--only", nargs="*", help="download just these (at the versions installed here)")
    parser.add_argument("--have", type=Path, help="the target's `pip freeze`: skip what it has at an accepted version")
    args = parser.parse_args(argv)

    closure = installed_closure()
    skip = {canonicalize_name(s) for s in args.skip}
    wanted = {canonicalize_name(n) for n in args.only} if args.only else set(closure)
    missing = wanted - set(closure)
    if missing:
        print(f"prospect.wheelhouse: error: not installed here: {', '.join(sorted(missing))}", file=sys.stderr)
        return 2
    have = target_versions(args.have) if args.have else {}
    chosen = choose_wheels(closure, requirement_specs(), have, skip, wanted)
    args.dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", args.python_version, "-d", str(args.dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    print(f"downloading {len(chosen)} wheels: {' '.join(chosen)}")
    failed = []
    for requirement in chosen:
        if subprocess.call(command + [requirement], stdout=subprocess.DEVNULL) == 0:
            continue
        # no binary wheel (e.g. docopt): build a pure-Python wheel here
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(args.dest), requirement]
        if subprocess.call(build, stdout=subprocess.DEVNULL) != 0:
            failed.append(requirement)
    if failed:
        print(f"prospect.wheelhouse: error: no wheel for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
