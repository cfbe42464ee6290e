"""Config: YAML + TUNESERVE_* env + flags, validated with messages that name the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tuneserve.config import Settings, env_name, iter_fields, load_settings
from tuneserve.errors import ConfigError


def test_defaults_are_valid() -> None:
    settings = load_settings(environ={})
    assert settings.server.port == 8000
    assert settings.engines.llamacpp.enabled and not settings.engines.vllm.enabled
    assert settings.resolved_gguf_path() == Path("data/models/smollm2-135m-instruct/model.gguf")


def test_yaml_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "tuneserve.yaml"
    config.write_text("server:\n  port: 9000\n  host: 0.0.0.0\nengines:\n  vllm:\n    enabled: true\n")
    env = {"TUNESERVE_SERVER__PORT": "9100", "TUNESERVE_ENGINES__VLLM__URL": "http://gpu:8000"}
    settings = load_settings(config, {"engines.vllm.breaker.failure_threshold": 7}, env)
    assert settings.server.port == 9100  # env beats the file
    assert settings.server.host == "0.0.0.0"  # file beats defaults
    assert settings.engines.vllm.enabled is True
    assert settings.engines.vllm.url == "http://gpu:8000"
    assert settings.engines.vllm.breaker.failure_threshold == 7  # flags beat all


def test_config_file_from_env(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  max_model_len: 1024\n")
    assert load_settings(environ={"TUNESERVE_CONFIG": str(config)}).model.max_model_len == 1024


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("server:\n  prot: 1\n", "unknown key 'server.prot'"),
        ("server:\n  port: seventy\n", "key 'server.port'"),
        ("server:\n  port: 70000\n", "key 'server.port'"),
        ("engines:\n  vllm:\n    url: gpu:8000\n", "key 'engines.vllm.url'"),
        ("engines:\n  llamacpp:\n    enabled: false\n", "enable at least one engine"),
        (
            "adapters:\n  max_rank: 128\nengines:\n  vllm:\n    enabled: true\n",
            "adapters.max_rank (128) is above engines.vllm.max_lora_rank (64)",
        ),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, yaml_text: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        load_settings(config, environ={})
    assert str(config) in str(info.value)


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("server:\n  port: 1\n  host: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_settings(config, environ={})


def test_unknown_env_var_is_an_error() -> None:
    with pytest.raises(ConfigError, match="TUNESERVE_SERVER__PROT"):
        load_settings(environ={"TUNESERVE_SERVER__PROT": "1"})


def test_bad_env_value_names_key() -> None:
    with pytest.raises(ConfigError, match=r"key 'engines\.llamacpp\.workers'"):
        load_settings(environ={"TUNESERVE_ENGINES__LLAMACPP__WORKERS": "0"})


def test_serve_help_documents_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuneserve.cli.main", "serve", "--help"],
        capture_output=True, text=True, check=True,
    )
    # argparse wraps long words across lines; compare without whitespace.
    text = "".join(result.stdout.split())
    for key, info in iter_fields(Settings):
        assert f"--{key}" in text, key
        assert env_name(key) in text, key
        assert info.description, f"{key} has no description"


def test_cli_reports_config_error_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuneserve.cli.main", "serve", "--server.port", "0"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "key 'server.port'" in result.stderr
    assert "Traceback" not in result.stderr
