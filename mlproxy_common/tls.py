"""TLS for every hop: certificate files from flags or the environment, gRPC and ssl credentials
built from them, and a throwaway certificate authority for the local stack (`mlproxy up --tls`).

Names of the environment variables (a flag, when the command has one, wins):

- `MLPROXY_TLS_CERT`, `MLPROXY_TLS_KEY`: this server's certificate chain and private key (PEM)
- `MLPROXY_TLS_CA`: the CA that signs the clients' certificates (ext_proc: Envoy's), which
  ext_proc then requires
- `MLPROXY_CA_FILE`: the CA the CLI and `mlproxy healthcheck --http` trust for https:// URLs

Certificate generation needs the `cryptography` package (the `local` extra); nothing else here
does, so the container images do without it.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "LocalPki",
    "TlsConfigError",
    "TlsFiles",
    "add_grpc_port",
    "add_tls_flags",
    "client_ssl_context",
    "envoy_upstream_tls",
    "grpc_channel_credentials",
    "grpc_server_credentials",
    "make_local_pki",
    "server_files_from_args",
    "server_ssl_context",
    "tls_files",
]

log = logging.getLogger(__name__)

ENV_CERT = "MLPROXY_TLS_CERT"
ENV_KEY = "MLPROXY_TLS_KEY"
ENV_CA = "MLPROXY_TLS_CA"
ENV_CA_FILE = "MLPROXY_CA_FILE"


class TlsConfigError(ValueError):
    """Certificate settings that cannot work; the message says which and what to do."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one endpoint: its certificate chain and key, and the CA it trusts for the
    other side (None: no client certificates asked for)."""

    cert: Path
    key: Path
    ca: Path | None = None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """The files' contents; TlsConfigError naming the file that cannot be read."""
        out: list[bytes | None] = []
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path is None:
                out.append(None)
                continue
            try:
                data = path.read_bytes()
            except OSError as err:
                raise TlsConfigError(f"TLS {what} {path}: cannot read: {err.strerror}") from err
            if b"-----BEGIN " not in data:
                raise TlsConfigError(f"TLS {what} {path}: not a PEM file")
            out.append(data)
        cert, key, ca = out
        assert cert is not None and key is not None
        return cert, key, ca

    def mtimes(self) -> tuple[int, ...]:
        stamps = []
        for path in (self.cert, self.key, self.ca):
            try:
                stamps.append(0 if path is None else path.stat().st_mtime_ns)
            except OSError:
                stamps.append(-1)
        return tuple(stamps)


def tls_files(
    cert: str | Path | None = None,
    key: str | Path | None = None,
    ca: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    require_ca: bool = False,
) -> TlsFiles | None:
    """The files from the flags, else from MLPROXY_TLS_CERT/KEY/CA; None when none is set.

    Only some of them set is a TlsConfigError naming the missing ones (a server must not fall
    back to plaintext because one variable has a typo)."""
    env = os.environ if env is None else env
    values = {
        "--tls-cert / " + ENV_CERT: cert or env.get(ENV_CERT) or None,
        "--tls-key / " + ENV_KEY: key or env.get(ENV_KEY) or None,
        "--tls-ca / " + ENV_CA: ca or env.get(ENV_CA) or None,
    }
    given = {k: v for k, v in values.items() if v}
    if not given:
        return None
    wanted = list(values) if require_ca else list(values)[:2]
    missing = [k for k in wanted if k not in given]
    if missing:
        raise TlsConfigError(
            f"TLS needs {', '.join(wanted)}; missing: {', '.join(missing)} "
            "(set all of them for TLS, or none for plaintext)"
        )
    ca_value = values["--tls-ca / " + ENV_CA]
    return TlsFiles(
        Path(str(values["--tls-cert / " + ENV_CERT])),
        Path(str(values["--tls-key / " + ENV_KEY])),
        Path(str(ca_value)) if ca_value else None,
    )


# ---- gRPC ------------------------------------------------------------------------------------


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate signed by `files.ca`.

    The files are read again when they change (cert-manager renews them in place): each new
    connection's handshake checks their modification times, and a renewed certificate is used
    from the next connection on. A renewal that cannot be read is logged and the certificate in
    use is kept."""
    import grpc

    if files.ca is None:
        raise TlsConfigError("ext_proc's TLS needs a CA to verify Envoy's client certificate")

    def configuration(data: tuple[bytes, bytes, bytes | None]) -> object:
        cert, key, ca = data
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    seen = files.mtimes()
    initial = configuration(files.read())

    def fetch() -> object | None:
        nonlocal seen
        now = files.mtimes()
        if now == seen:
            return None
        try:
            config = configuration(files.read())
        except TlsConfigError as err:
            log.error("TLS files changed but cannot be used (keeping the current ones): %s", err)
            return None
        seen = now
        log.info("TLS certificate files changed: new connections use them")
        return config

    return grpc.dynamic_ssl_server_credentials(
        initial,
        fetch,
        require_client_authentication=True,
    )


def grpc_channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client credentials: trust `ca` (None: the system's roots), present cert/key if given."""
    import grpc

    if (cert is None) != (key is None):
        raise TlsConfigError("a client certificate needs both --tls-cert and --tls-key")
    root = None if ca is None else TlsFiles(ca, ca).read()[0]
    chain = None if cert is None else TlsFiles(cert, cert).read()[0]
    private = None if key is None else TlsFiles(key, key).read()[0]
    return grpc.ssl_channel_credentials(root, private, chain)


# ---- ssl (HTTPS) -----------------------------------------------------------------------------


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """For an HTTPS server (TLS 1.2+); TlsConfigError if the files do not fit together."""
    files.read()  # clear errors for missing or non-PEM files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as err:
        raise TlsConfigError(
            f"TLS certificate {files.cert} and key {files.key} do not fit together: {err.reason}"
        ) from err
    return ctx


def client_ssl_context(ca: Path | None = None) -> ssl.SSLContext:
    """Verifies the server's certificate and name: against `ca` if given, else the system's
    trusted roots."""
    ctx = ssl.create_default_context()
    if ca is not None:
        TlsFiles(ca, ca).read()
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as err:
            raise TlsConfigError(f"CA file {ca}: not usable: {err.reason}") from err
    return ctx


# ---- a throwaway CA for the local stack ------------------------------------------------------


@dataclass(frozen=True)
class LocalPki:
    """A CA and the certificates of the local stack, as PEM files in one directory."""

    directory: Path
    ca: Path
    server: TlsFiles  # ext_proc and the control plane (serverAuth + clientAuth)
    client: TlsFiles  # Envoy's client certificate towards ext_proc


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    mode = stat.S_IRUSR | stat.S_IWUSR if private else 0o644
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)  # an existing file keeps its mode through O_CREAT


def make_local_pki(
    directory: Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 2,
    ca_name: str = "MLProxy local CA",
) -> LocalPki:
    """A new CA and two leaf certificates valid for `hosts` (IPs or DNS names), `days` long,
    written to `directory` with the private keys readable by their owner only (0600). Nothing
    keeps the CA's key: no other certificate can ever be signed by this CA."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _Signer(ca_key, _ca_certificate(ca_key, ca_name, validity), validity)
    ca_path = directory / "ca.crt"
    _write(ca_path, ca.cert.public_bytes(serialization.Encoding.PEM), private=False)
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    out: dict[str, TlsFiles] = {}
    for role, usages in (("server", both), ("client", [ExtendedKeyUsageOID.CLIENT_AUTH])):
        cert_pem, key_pem = ca.leaf(f"mlproxy-{role}", usages, hosts)
        _write(directory / f"{role}.crt", cert_pem, private=False)
        _write(directory / f"{role}.key", key_pem, private=True)
        out[role] = TlsFiles(directory / f"{role}.crt", directory / f"{role}.key", ca_path)
    return LocalPki(directory, ca_path, out["server"], out["client"])


def _pki_name(common: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MLProxy local stack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); a leaf signs handshakes."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    name: str,
    validity: tuple[datetime.datetime, datetime.datetime],
) -> x509.Certificate:
    """A self-signed CA certificate that can sign leaves only (path length 0)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return (
        x509.CertificateBuilder()
        .subject_name(_pki_name(name))
        .issuer_name(_pki_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True)
class _Signer:
    """The local CA while `make_local_pki` runs: its key is never written anywhere."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    validity: tuple[datetime.datetime, datetime.datetime]

    def leaf(
        self, common: str, usages: list[x509.ObjectIdentifier], hosts: Sequence[str]
    ) -> tuple[bytes, bytes]:
        """A new key and its certificate for `hosts` with extended key `usages`, as PEM."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_pki_name(common))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.validity[0])
            .not_valid_after(self.validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return (
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


def add_grpc_port(server: grpc.aio.Server, address: str, files: TlsFiles | None) -> int:
    """Listen on `address`: mTLS with `files`, else plaintext with a warning saying how to turn
    TLS on. Returns the bound port (0: could not bind)."""
    if files is None:
        log.warning(
            "ext_proc serves plaintext gRPC on %s: anything that reaches this port can submit "
            "inference. For mTLS give --tls-cert, --tls-key and --tls-ca (or %s, %s, %s) and "
            "configure Envoy's cluster with the matching client certificate (docs/security.md, "
            "'Authentication and encryption (mTLS)')",
            address,
            ENV_CERT,
            ENV_KEY,
            ENV_CA,
        )
        return int(server.add_insecure_port(address))
    port = int(server.add_secure_port(address, grpc_server_credentials(files)))
    log.info(
        "ext_proc serves gRPC over TLS on %s and requires client certificates of %s",
        address,
        files.ca,
    )
    return port


def add_tls_flags(parser: argparse.ArgumentParser, ca_help: str | None) -> None:
    """--tls-cert and --tls-key (and --tls-ca unless `ca_help` is None) on a server command."""
    parser.add_argument("--tls-cert", metavar="FILE", help=f"certificate chain, PEM ({ENV_CERT})")
    parser.add_argument("--tls-key", metavar="FILE", help=f"private key, PEM ({ENV_KEY})")
    if ca_help is not None:
        parser.add_argument("--tls-ca", metavar="FILE", help=f"{ca_help} ({ENV_CA})")


def server_files_from_args(args: argparse.Namespace, require_ca: bool) -> TlsFiles | None:
    """The server's TLS files from its flags or the environment, checked: they exist, are PEM,
    and the key fits the certificate (TlsConfigError otherwise)."""
    files = tls_files(
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
        getattr(args, "tls_ca", None),
        require_ca=require_ca,
    )
    if files is not None:
        server_ssl_context(files)
        if files.ca is not None:
            client_ssl_context(files.ca)
    return files


def envoy_upstream_tls(
    cert: str | Path, key: str | Path, ca: str | Path, san: str | None, sni: str | None = None
) -> dict[str, Any]:
    """The `transport_socket` of Envoy's ext_proc cluster for mTLS: Envoy presents `cert`,
    verifies ext_proc's certificate against `ca` and, if `san` is given, that it names `san`
    (a DNS SAN). ALPN h2: gRPC."""
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(ca)}}
    if san:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "DNS", "matcher": {"exact": san}}
        ]
    context: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(cert)},
                    "private_key": {"filename": str(key)},
                }
            ],
            "validation_context": validation,
        },
    }
    if sni:
        context["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}
