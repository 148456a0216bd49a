"""deploy.kuberay.generate: the merge that turns serve/config.yaml into the RayService's serveConfigV2,
and the in-place rewrite of the manifest (pure functions, plus the CLI on files in a temp dir)."""
from __future__ import annotations

import pytest
import yaml

from deploy.kuberay.generate import OverrideError, main, merge_overrides, render, with_serve_config

BASE = {
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": [
        {"name": "other", "import_path": "x:y", "args": {"model": None}},
        {"name": "raylens", "import_path": "serve.app:build_app", "args": {"model": None, "num_gpus": 0, "limits": [1, 2]}},
    ],
}

MANIFEST = """\
# a comment the generator keeps
apiVersion: ray.io/v1
kind: RayService
spec:
  serveConfigV2: |
    stale: true

    still: stale
  rayClusterConfig:
    rayVersion: "2.60.0"  # kept too
"""


def test_overrides_merge_by_key_and_by_application_name():
    merged = merge_overrides(BASE, {"http_options": {"host": "0.0.0.0"},
                                    "applications": [{"name": "raylens", "args": {"model": "org/m", "num_gpus": 1, "limits": [3]}}]})
    assert merged["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert merged["applications"][0] == BASE["applications"][0]  # other applications untouched
    assert merged["applications"][1]["args"] == {"model": "org/m", "num_gpus": 1, "limits": [3]}  # plain lists replaced
    assert merged["applications"][1]["import_path"] == "serve.app:build_app"
    assert BASE["applications"][1]["args"]["model"] is None  # the input is not modified


@pytest.mark.parametrize("overrides, where", [
    ({"http_option": {"host": "0.0.0.0"}}, "http_option"),
    ({"applications": [{"name": "raylens", "args": {"num_gpu": 1}}]}, "applications[name=raylens].args.num_gpu"),
    ({"applications": [{"name": "raylen", "args": {}}]}, "applications[name=raylen]"),
])
def test_an_override_serve_config_does_not_have_is_refused(overrides, where):
    with pytest.raises(OverrideError, match=r"^" + __import__("re").escape(where) + ":"):
        merge_overrides(BASE, overrides)


def test_rewrites_only_the_serve_config_block():
    config = {"applications": [{"name": "a", "args": {"x": 1}}]}
    out = with_serve_config(MANIFEST, render(config))
    assert yaml.safe_load(yaml.safe_load(out)["spec"]["serveConfigV2"]) == config
    assert out.startswith("# a comment the generator keeps\n") and 'rayVersion: "2.60.0"  # kept too' in out
    assert "stale" not in out
    assert with_serve_config(out, render(config)) == out  # idempotent


def test_cli_writes_then_check_passes_and_catches_drift(tmp_path, capsys):
    manifest, serve_config, overrides = tmp_path / "rayservice.yaml", tmp_path / "config.yaml", tmp_path / "over.yaml"
    manifest.write_text(MANIFEST)
    serve_config.write_text(yaml.safe_dump(BASE))
    overrides.write_text("http_options:\n  host: 0.0.0.0\n")
    paths = ["--manifest", str(manifest), "--serve-config", str(serve_config), "--overrides", str(overrides)]
    assert main(["--check", *paths]) == 1  # stale
    assert main(paths) == 0
    assert yaml.safe_load(yaml.safe_load(manifest.read_text())["spec"]["serveConfigV2"])["http_options"]["host"] == "0.0.0.0"
    assert main(["--check", *paths]) == 0
    serve_config.write_text(yaml.safe_dump({**BASE, "proxy_location": "HeadOnly"}))  # serve's config changes
    assert main(["--check", *paths]) == 1
    assert "out of date" in capsys.readouterr().err
    overrides.write_text("http_options:\n  hots: 0.0.0.0\n")
    assert main(["--check", *paths]) == 2 and "http_options.hots" in capsys.readouterr().err
