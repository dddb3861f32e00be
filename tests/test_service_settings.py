"""The BentoML server's settings are read when the service starts, not when its module is imported: the
decorator's are fixed (``SERVICE_DEFAULTS``), ``nextbest serve`` turns the workers and the ``NEXTBEST_*`` server
variables into BentoML's ``BENTOML_CONFIG_OVERRIDES``, and BentoML's own start merges them (checked through
BentoML's configuration container, in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nextbest.serving.engine import EngineConfig, EngineLoadError
from nextbest.serving.server import (
    DEFAULT_MAX_BATCH,
    OVERRIDES_ENV,
    SERVICE_DEFAULTS,
    bentoml_overrides,
    max_batch,
    service_env,
)

ROOT = Path(__file__).resolve().parent.parent


def test_nothing_asked_gives_no_overrides_and_the_defaults_stay():
    assert bentoml_overrides({}) == {}
    assert bentoml_overrides({"NEXTBEST_METRICS": "1", "NEXTBEST_TRACING": "0"}) == {}
    assert SERVICE_DEFAULTS["logging"] == {"access": {"enabled": False}}
    assert SERVICE_DEFAULTS["metrics"] == {"enabled": True}
    assert "/recommend" in SERVICE_DEFAULTS["tracing"]["excluded_urls"]
    assert max_batch({}) == DEFAULT_MAX_BATCH == 64


def test_each_variable_becomes_its_bentoml_setting():
    env = {"NEXTBEST_ACCESS_LOG": "yes", "NEXTBEST_TRACING": "1", "NEXTBEST_METRICS": "off"}
    assert bentoml_overrides(env, workers=3) == {
        "services": {
            "nextbest": {
                "workers": 3,
                "logging": {"access": {"enabled": True}},
                "tracing": {"excluded_urls": []},
                "metrics": {"enabled": False},
            }
        }
    }
    assert max_batch({"NEXTBEST_MAX_BATCH": "1"}) == 1


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("NEXTBEST_ACCESS_LOG", "maybe", r"NEXTBEST_ACCESS_LOG='maybe' is not a yes/no value"),
        ("NEXTBEST_THREADS", "eight", r"NEXTBEST_THREADS='eight' is not a whole number of at least 1"),
        ("NEXTBEST_THREADS", "0", r"NEXTBEST_THREADS='0' is not a whole number"),
        (OVERRIDES_ENV, "{not json", r"BENTOML_CONFIG_OVERRIDES is not JSON"),
    ],
)
def test_a_value_the_server_cannot_take_is_refused_at_start_naming_it(tmp_path, variable, value, message):
    config = EngineConfig(data=tmp_path / "data", state_dir=tmp_path / "state")
    with pytest.raises(EngineLoadError, match=message):
        service_env(config, base={variable: value, "NEXTBEST_TRACING": "1"}, workers=2)
    with pytest.raises(EngineLoadError, match=r"NEXTBEST_MAX_BATCH='-1'"):
        max_batch({"NEXTBEST_MAX_BATCH": "-1"})


def test_service_env_merges_over_the_overrides_a_user_gave(tmp_path):
    config = EngineConfig(data=tmp_path / "data", state_dir=tmp_path / "state")
    given = {"services": {"nextbest": {"traffic": {"timeout": 90}}}, "api_server": {"backlog": 512}}
    env = service_env(config, base={OVERRIDES_ENV: json.dumps(given), "NEXTBEST_ACCESS_LOG": "1"}, workers=2)
    assert json.loads(env[OVERRIDES_ENV]) == {
        "services": {
            "nextbest": {"traffic": {"timeout": 90}, "workers": 2, "logging": {"access": {"enabled": True}}}
        },
        "api_server": {"backlog": 512},
    }
    assert OVERRIDES_ENV not in service_env(config, base={})  # nothing asked: BentoML's settings untouched
    assert service_env(config, base={}, threads=3)["NEXTBEST_THREADS"] == "3"


PROBE = """
import json
from nextbest.serving.service import NextBest
from bentoml._internal.configuration.containers import BentoMLContainer

NextBest.inject_config()  # what BentoML runs when it starts the service
merged = BentoMLContainer.config.services["nextbest"].get()
print(json.dumps({
    "workers": merged["workers"],
    "access": merged["logging"]["access"]["enabled"],
    "metrics": BentoMLContainer.config.api_server.metrics.enabled.get(),
    "tracing": merged["tracing"]["excluded_urls"],
    "threads": NextBest.config["threads"],
}))
"""


def started_with(env: dict[str, str]) -> dict:
    """BentoML's settings of the service as its start merges them, in a fresh interpreter with ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "BENTOML_CONFIG"))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env, "BENTOML_DO_NOT_TRACK": "True"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh interpreters importing BentoML
def test_bentoml_applies_the_settings_when_the_service_starts(tmp_path):
    config = EngineConfig(data=tmp_path / "data", state_dir=tmp_path / "state")
    plain = started_with({})
    assert plain == {
        "workers": 1,
        "access": False,
        "metrics": True,
        "tracing": SERVICE_DEFAULTS["tracing"]["excluded_urls"],
        "threads": 8,
    }
    asked = {"NEXTBEST_ACCESS_LOG": "1", "NEXTBEST_TRACING": "1", "NEXTBEST_METRICS": "0"}
    env = service_env(config, base=asked, workers=2, threads=3)
    keep = (OVERRIDES_ENV, "NEXTBEST_THREADS")
    assert started_with({k: env[k] for k in keep}) == {
        "workers": 2,
        "access": True,
        "metrics": False,
        "tracing": [],
        "threads": 3,
    }
