"""Write the RayService's `serveConfigV2` from `serve/config.yaml`, so the two cannot drift apart.

    python -m deploy.kuberay.generate           # rewrite deploy/kuberay/rayservice.yaml's serveConfigV2
    python -m deploy.kuberay.generate --check   # exit 1 if the committed manifest is out of date

`serve/config.yaml` is what `serve run` and `serve deploy` use; on Kubernetes the same application
runs with a few settings changed (listen on the pod's address, a real model on GPUs, replicas sized
for lmdeploy). Those changes live in `deploy/kuberay/serve-overrides.yaml`, whose every key must
already exist in `serve/config.yaml`: a setting renamed there makes this command fail instead of
silently deploying the old name. Only the `serveConfigV2` block of the manifest is rewritten; the rest
of it (cluster layout, comments) is edited by hand.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "serve" / "config.yaml"
OVERRIDES = Path(__file__).resolve().parent / "serve-overrides.yaml"
MANIFEST = Path(__file__).resolve().parent / "rayservice.yaml"

_KEY = re.compile(r"^(?P<indent>[ ]*)serveConfigV2:[ ]*\|[-+]?[ ]*$")


class OverrideError(ValueError):
    """An override names a setting or an application that serve/config.yaml does not have."""


def merge_overrides(base: dict, overrides: dict, path: str = "") -> dict:
    """`base` with `overrides` applied. Mappings merge key by key (each key must exist in `base`);
    lists of named items (Serve's `applications`, `deployments`) merge item by `name`; anything else
    is replaced."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in merged:
            raise OverrideError(f"{where}: serve/config.yaml has no such setting")
        current = merged[key]
        if isinstance(current, dict) and isinstance(value, dict):
            merged[key] = merge_overrides(current, value, where)
        elif isinstance(current, list) and isinstance(value, list) and all(_named(v) for v in value):
            merged[key] = _merge_named(current, value, where)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _named(item) -> bool:
    return isinstance(item, dict) and "name" in item


def _merge_named(base: list, overrides: list, path: str) -> list:
    merged = copy.deepcopy(base)
    index = {item.get("name"): i for i, item in enumerate(merged) if isinstance(item, dict)}
    for item in overrides:
        name = item["name"]
        if name not in index:
            raise OverrideError(f"{path}[name={name}]: serve/config.yaml has no such entry")
        merged[index[name]] = merge_overrides(merged[index[name]], item, f"{path}[name={name}]")
    return merged


def cluster_serve_config(serve_config: dict, overrides: dict) -> dict:
    return merge_overrides(serve_config, overrides)


def render(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)


def with_serve_config(manifest: str, serve_yaml: str) -> str:
    """`manifest` with the block under its `serveConfigV2: |` key replaced by `serve_yaml`."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _KEY.match(line.rstrip("\n"))]
    if len(starts) != 1:
        raise ValueError(f"expected one `serveConfigV2: |` line in the manifest, found {len(starts)}")
    start = starts[0]
    indent = len(_KEY.match(lines[start].rstrip("\n")).group("indent"))
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block stay outside it
        end -= 1
    pad = " " * (indent + 2)
    block = [f"{pad}{line}\n" if line else "\n" for line in serve_yaml.rstrip("\n").split("\n")]
    return "".join(lines[: start + 1] + block + lines[end:])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def generated_manifest(manifest: Path = MANIFEST, serve_config: Path = SERVE_CONFIG, overrides: Path = OVERRIDES) -> str:
    config = cluster_serve_config(yaml.safe_load(serve_config.read_text()), yaml.safe_load(overrides.read_text()) or {})
    return with_serve_config(manifest.read_text(), render(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.kuberay.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the manifest is up to date")
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    parser.add_argument("--overrides", type=Path, default=OVERRIDES)
    args = parser.parse_args(argv)
    try:
        text = generated_manifest(args.manifest, args.serve_config, args.overrides)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if text == args.manifest.read_text():
        print(f"{args.manifest} is up to date")
        return 0
    if args.check:
        print(f"{args.manifest} is out of date: run python -m deploy.kuberay.generate", file=sys.stderr)
        return 1
    args.manifest.write_text(text)
    print(f"wrote {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
