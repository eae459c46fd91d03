"""Settings: defaults, environment variables, validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.settings import MIB, Settings, get_settings

KEY_A = "a" * 16 + "-first"
KEY_B = "b" * 16 + "-second"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No REGCL_* variable leaks in from the machine; relative paths resolve in tmp_path."""
    for name in list(os.environ):
        if name.startswith("REGCL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults(tmp_path: Path) -> None:
    s = Settings()
    assert s.redis_url == "redis://127.0.0.1:6390/0"
    assert s.redis_port == 6390
    assert s.data_dir == (tmp_path / "var").resolve()
    assert s.artifact_url == str((tmp_path / "var" / "artifacts").resolve())
    assert s.artifacts_are_local
    assert s.model == "tiny" and s.checkpoint is None
    assert s.admin_keys == () and not s.mutations_enabled
    assert not s.is_admin_key("anything")
    assert s.segment_requires_key is False
    assert s.embedding_cache_bytes == 256 * MIB
    assert s.max_upload_bytes == 64 * MIB
    assert s.max_image_pixels == 16_000_000
    assert s.job_visibility_timeout_s == 6 * 3600
    assert (s.api_host, s.api_port) == ("127.0.0.1", 8000)


def test_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ckpt = tmp_path / "sam_vit_b.pth"
    monkeypatch.setenv("REGCL_MODEL", "vit_b")
    monkeypatch.setenv("REGCL_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("REGCL_ADMIN_KEYS", f" {KEY_A} ,{KEY_B},, ")
    monkeypatch.setenv("REGCL_SEGMENT_REQUIRES_KEY", "true")
    monkeypatch.setenv("REGCL_REDIS_PORT", "6400")
    monkeypatch.setenv("REGCL_DATA_DIR", "state")
    monkeypatch.setenv("REGCL_ARTIFACT_URL", "s3://bucket/prefix")
    monkeypatch.setenv("REGCL_EMBEDDING_CACHE_BYTES", "0")
    monkeypatch.setenv("REGCL_API_PORT", "9001")
    s = Settings()
    assert s.model == "vit_b" and s.checkpoint == ckpt
    assert [k.get_secret_value() for k in s.admin_keys] == [KEY_A, KEY_B]
    assert s.mutations_enabled and s.segment_requires_key
    assert s.is_admin_key(KEY_B) and not s.is_admin_key(KEY_B + "x") and not s.is_admin_key("")
    assert s.redis_url == "redis://127.0.0.1:6400/0"  # follows redis_port
    assert s.data_dir == (tmp_path / "state").resolve()
    assert s.artifact_url == "s3://bucket/prefix" and not s.artifacts_are_local
    assert s.embedding_cache_bytes == 0
    assert s.api_port == 9001
    # Secrets stay out of logs and tracebacks.
    assert KEY_A not in repr(s) and KEY_A not in str(s.model_dump())


def test_explicit_redis_url_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGCL_REDIS_URL", "redis://cache.internal:6379/2")
    monkeypatch.setenv("REGCL_REDIS_PORT", "6400")
    assert Settings().redis_url == "redis://cache.internal:6379/2"


@pytest.mark.parametrize(("env", "message"), [
    ({"REGCL_MODEL": "vit_h"}, "REGCL_CHECKPOINT"),
    ({"REGCL_MODEL": "vit_x"}, "model"),
    ({"REGCL_API_PORT": "0"}, "api_port"),
    ({"REGCL_REDIS_URL": "http://localhost:6379"}, "redis_url"),
    ({"REGCL_ARTIFACT_URL": "nosuchproto://bucket"}, "nosuchproto"),
    ({"REGCL_ADMIN_KEYS": "short"}, "16 characters"),
    ({"REGCL_SEGMENT_REQUIRES_KEY": "1"}, "admin_keys is empty"),
    ({"REGCL_JOB_VISIBILITY_TIMEOUT_S": "5"}, "job_visibility_timeout_s"),
    ({"REGCL_MAX_UPLOAD_BYTES": "-1"}, "max_upload_bytes"),
])
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                    message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message) as info:
        Settings()
    assert isinstance(info.value, ValueError)


def test_get_settings_is_cached_and_clearable(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("REGCL_API_PORT", "8101")
        first = get_settings()
        monkeypatch.setenv("REGCL_API_PORT", "8102")
        assert get_settings() is first and first.api_port == 8101
        get_settings.cache_clear()
        assert get_settings().api_port == 8102
    finally:
        get_settings.cache_clear()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.api_port = 1  # type: ignore[misc]
