"""`mlproxy up --upstream URL`: what it accepts, and the Envoy config it makes, checked by the
real Envoy (`--mode validate`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlproxy.envoy_config import Upstream, local_config
from tests.integration.test_manifests import envoy_validate


@pytest.mark.parametrize(
    ("url", "host", "port", "tls", "authority"),
    [
        ("http://my-kserve:8080", "my-kserve", 8080, False, "my-kserve:8080"),
        ("http://10.0.0.7", "10.0.0.7", 80, False, "10.0.0.7"),
        ("https://models.example.com/", "models.example.com", 443, True, "models.example.com"),
        ("https://[::1]:8443", "::1", 8443, True, "[::1]:8443"),
    ],
)
def test_an_upstream_is_a_server_address(
    url: str, host: str, port: int, tls: bool, authority: str
) -> None:
    up = Upstream.parse(url)
    assert (up.host, up.port, up.tls, up.authority) == (host, port, tls, authority)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("my-kserve:8080", "give http://host"),
        ("ftp://x", "give http://host"),
        ("http://x/v1/models", "no path"),
        ("http://x?a=1", "no path"),
        ("http://user:pw@x", "credentials"),
        ("http://:pw@x", "credentials"),
        ("http://x:99999", "out of range"),
    ],
)
def test_what_is_not_a_server_address_is_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Upstream.parse(url)


@pytest.mark.parametrize(
    "url", ["http://my-kserve:8080", "http://127.0.0.1:9000", "https://example.com"]
)
def test_envoy_takes_the_config_for_an_upstream(url: str, tmp_path: Path) -> None:
    config = local_config(upstream=Upstream.parse(url))
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "model"]
    assert cluster["type"] == ("STATIC" if "127.0.0.1" in url else "STRICT_DNS")
    envoy_validate(config, tmp_path, url.split("//")[1].replace(":", "-"))
