#!/usr/bin/env python3
"""Checks Cargo.toml's `rust-version` (the oldest Rust the sidecar claims to build with)
without installing that toolchain (CI has no network for rustup):

1. it is not newer than the toolchain CI builds with (rust-toolchain.toml, `rustc -V`);
2. no dependency the sidecar builds with (normal and build dependencies, on the shipped
   Linux targets, as Cargo.lock resolves them) declares a newer `rust-version` of its own.

What this does not prove: that our own code uses no newer language or std feature. Only
a build with that toolchain shows that (`cargo +<rust-version> check --locked`, which
.ci/run runs when the toolchain happens to be installed).
"""

import json
import re
import subprocess
import sys


def version(text: str) -> tuple[int, int, int]:
    parts = [int(x) for x in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def main() -> int:
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--locked", "--format-version", "1",
             "--filter-platform", "x86_64-unknown-linux-gnu"],
            check=True, capture_output=True, text=True,
        ).stdout
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = packages[meta["resolve"]["root"]]
    declared = root.get("rust_version")
    if not declared:
        print("error: Cargo.toml has no rust-version", file=sys.stderr)
        return 1
    rustc = subprocess.run(["rustc", "-V"], check=True, capture_output=True, text=True).stdout
    toolchain = version(rustc.split()[1])
    problems = []
    if version(declared) > toolchain:
        problems.append(f"rust-version {declared} is newer than the CI toolchain ({rustc.strip()})")

    seen, stack = set(), [root["id"]]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for dep in nodes[node]["deps"]:
            if any(k["kind"] in (None, "build") for k in dep["dep_kinds"]):
                stack.append(dep["pkg"])
    for pkg_id in sorted(seen - {root["id"]}):
        p = packages[pkg_id]
        if p.get("rust_version") and version(p["rust_version"]) > version(declared):
            problems.append(f"{p['name']} {p['version']} needs Rust {p['rust_version']}")
    if problems:
        print(f"error: Cargo.toml says rust-version = \"{declared}\", but:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"rust-version {declared}: <= the CI toolchain ({rustc.split()[1]}), "
          f"and no dependency of the {len(seen) - 1} built needs newer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
