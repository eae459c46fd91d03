"""The Label Studio origin: which task image URLs may be fetched (everything else is refused
before a request is made), and the REGCL_LABEL_STUDIO_URL setting's validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.settings import Settings
from regcl.errors import ConfigError
from service.labelstudio.origin import label_studio_origin, parse_origin

ORIGIN = parse_origin("http://LS.example:8080/")


@pytest.mark.parametrize("url, expected", [
    ("/data/upload/3/a.png", "http://ls.example:8080/data/upload/3/a.png"),
    ("/data/local-files/?d=imgs/a.png", "http://ls.example:8080/data/local-files/?d=imgs/a.png"),
    ("data/upload/3/a.png", "http://ls.example:8080/data/upload/3/a.png"),
    ("http://ls.example:8080/data/upload/1/x.jpg", "http://ls.example:8080/data/upload/1/x.jpg"),
    ("HTTP://LS.EXAMPLE:8080/data/x.jpg", "http://LS.EXAMPLE:8080/data/x.jpg"),
])
def test_urls_inside_the_origin(url: str, expected: str) -> None:
    assert ORIGIN.resolve(url) == expected


@pytest.mark.parametrize("url", [
    "http://evil.example/x.png",                   # another host
    "http://ls.example:8081/data/x.png",           # another port
    "http://ls.example/data/x.png",                # the default port is another port
    "https://ls.example:8080/data/x.png",          # another scheme
    "//evil.example/x.png",                        # scheme-relative: another host
    "http://ls.example:8080@evil.example/x.png",   # user info: the host is evil.example
    "http://user:pw@ls.example:8080/data/x.png",   # user info on the right host
    "http://ls.example:8080\\@evil.example/x",     # a backslash before an @
    "file:///etc/passwd",
    "gopher://ls.example:8080/x",
    "data:image/png;base64,AAAA",
    "s3://bucket/a.png",
    "http://ls.example:notaport/x",
    "http://[::1/x",
    "http://ls.example:8080/data/x.png\r\nHost: evil",  # control characters
    "",
    "x" * 9000,
])
def test_urls_outside_the_origin_are_refused(url: str) -> None:
    assert ORIGIN.resolve(url) is None


def test_a_base_path_confines_the_path() -> None:
    origin = parse_origin("https://ls.example/label-studio")
    assert origin.resolve("/label-studio/data/upload/a.png") == \
        "https://ls.example/label-studio/data/upload/a.png"
    assert origin.resolve("data/upload/a.png") == \
        "https://ls.example/label-studio/data/upload/a.png"
    assert origin.resolve("/other/a.png") is None
    assert origin.resolve("/label-studio/../admin") is None
    assert origin.resolve("/label-studio-evil/a.png") is None


def test_ipv6_origin() -> None:
    origin = parse_origin("http://[::1]:9000")
    assert origin.resolve("/data/a.png") == "http://[::1]:9000/data/a.png"
    assert origin.resolve("http://127.0.0.1:9000/data/a.png") is None


@pytest.mark.parametrize("url", ["ftp://ls.example", "http://", "ls.example:8080",
                                 "http://u:p@ls.example", "http://ls.example/?q=1",
                                 "http://ls.example/#f", "http://ls.example:99999"])
def test_setting_refuses_what_is_no_origin(url: str) -> None:
    with pytest.raises(ConfigError, match="REGCL_LABEL_STUDIO_URL"):
        label_studio_origin(Settings(label_studio_url=url).label_studio_url)


def test_setting_is_normalised() -> None:
    assert label_studio_origin(" http://LS.example:80/ ").url == "http://ls.example"
    assert label_studio_origin(Settings().label_studio_url) is None
    assert Settings(gate_tolerance=0.05).gate_tolerance == 0.05
    with pytest.raises(ValidationError):
        Settings(gate_tolerance=-0.1)


def test_the_api_key_reaches_child_processes() -> None:
    # `regcl up` and the tests start the API and workers from settings_env(settings):
    # a SecretStr must travel as its value, not as "**********".
    from cli.up import settings_env

    settings = Settings(label_studio_url="http://ls.example", label_studio_api_key="t0ken-xyz")
    env = settings_env(settings)
    assert env["REGCL_LABEL_STUDIO_API_KEY"] == "t0ken-xyz"
    rebuilt = Settings(**{k.removeprefix("REGCL_").lower(): v for k, v in env.items()})
    assert rebuilt.label_studio_api_key.get_secret_value() == "t0ken-xyz"
    assert rebuilt.label_studio_url == "http://ls.example"
