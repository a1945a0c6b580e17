"""TLS certificates and SuperNode authentication keys for a medfed deployment.

Everything is made with ``cryptography`` in the formats Flower 1.41 reads:

* ``ca.crt`` / ``ca.key``: a private certificate authority (PEM). The CA certificate is
  the ``--ssl-ca-certfile`` of the SuperLink and the root certificate of every site and
  of ``medfed run``.
* ``server.crt`` / ``server.key``: the SuperLink certificate (PEM), signed by the CA, with
  every host name and IP address the sites dial as subject alternative names. It must
  also name the address the SuperLink's own ServerApp runtime connects to (127.0.0.1
  when the SuperLink binds 127.0.0.1 or 0.0.0.0), so the CLI always adds 127.0.0.1 and
  localhost.
* ``<site-id>.key`` / ``<site-id>.pub``: a site's ECDSA P-384 key pair in OpenSSH format,
  as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  expect (the same files ``ssh-keygen -t ecdsa -b 384 -N ""`` writes). The private key
  stays at the site; only the ``.pub`` file goes to the server operator.

``medfed certs all`` (a demo on one machine) writes the server's folder ``OUT`` (``ca.crt``,
``server.crt``, ``server.key`` and ``sites/``) and the CA in a folder of its own, ``OUT-ca``
beside it (``--ca-out``): the CA key never sits in the folder the server is given, and
``medfed certs server --ca OUT-ca`` signs a new server certificate with it later.

Private keys are written with mode 0600; every file is written atomically (temporary file
in the same folder, then ``os.replace``) and existing files are kept unless
``overwrite=True``.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from medfed.common.atomic import atomic_write_bytes
from medfed.common.errors import ConfigError
from medfed.common.logs import emit

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DIR_SUFFIX = "-ca"  # `medfed certs all --out OUT`: the CA goes to OUT-ca, beside the server's folder
SITES_DIR = "sites"  # `medfed certs all`: site key pairs under OUT/sites/
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
DEFAULT_SERVER_HOSTS = ("127.0.0.1", "localhost")
"""Always in the server certificate: the SuperLink's own ServerApp runtime dials 127.0.0.1."""

_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
_DNS_NAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CaPaths(NamedTuple):
    cert: Path
    key: Path


class ServerCertPaths(NamedTuple):
    cert: Path
    key: Path
    ca_cert: Path


class SiteKeyPaths(NamedTuple):
    private_key: Path
    public_key: Path


def create_ca(
    out_dir: str | Path,
    common_name: str = "medfed-ca",
    days: int = 3650,
    overwrite: bool = False,
) -> CaPaths:
    """Create a self-signed ECDSA P-384 certificate authority in ``out_dir``."""
    _check_days(days)
    out = Path(out_dir)
    paths = CaPaths(out / CA_CERT, out / CA_KEY)
    _refuse_existing(paths, overwrite)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, _HASH())
    )
    _write_private_key_pem(paths.key, key)
    _write_atomic(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def create_server_cert(
    out_dir: str | Path,
    ca_dir: str | Path,
    hosts: list[str],
    days: int = 825,
    overwrite: bool = False,
) -> ServerCertPaths:
    """Create the SuperLink certificate signed by the CA in ``ca_dir``.

    ``hosts`` are DNS names and IP addresses; each becomes a subject alternative name and
    the first one the common name. ``ca.crt`` is copied into ``out_dir`` so that the folder
    holds the three files ``medfed server start --certs`` needs.
    """
    _check_days(days)
    sans = _parse_hosts(hosts)
    out, ca = Path(out_dir), Path(ca_dir)
    ca_cert_path, ca_key_path = ca / CA_CERT, ca / CA_KEY
    missing = [str(p) for p in (ca_cert_path, ca_key_path) if not p.is_file()]
    if missing:
        raise ConfigError(
            f"CA file(s) missing: {', '.join(missing)}; create the CA first with "
            f"`medfed certs ca --out {ca}`"
        )
    paths = ServerCertPaths(out / SERVER_CERT, out / SERVER_KEY, out / CA_CERT)
    same_ca_file = paths.ca_cert.resolve() == ca_cert_path.resolve()
    _refuse_existing(paths[:2] if same_ca_file else paths, overwrite)

    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key_path} is not an ECDSA key; recreate the CA with `medfed certs ca`")
    key = ec.generate_private_key(_CURVE())
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _HASH())
    )
    _write_private_key_pem(paths.key, key)
    _write_atomic(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if not same_ca_file:
        _write_atomic(paths.ca_cert, ca_cert_path.read_bytes(), 0o644)
    return paths


def create_site_keys(out_dir: str | Path, site_id: str, overwrite: bool = False) -> SiteKeyPaths:
    """Create a site's ECDSA P-384 SuperNode authentication key pair (OpenSSH format).

    Register the public key on the SuperLink with ``medfed server register-site``; give
    the private key to ``medfed site start`` (``auth-key`` in site.yaml).
    """
    if not _SITE_ID.match(site_id):
        raise ConfigError(
            f"site-id={site_id!r} is not allowed in a key file name: use letters, digits, '-', '_' or '.'"
        )
    out = Path(out_dir)
    paths = SiteKeyPaths(out / f"{site_id}.key", out / f"{site_id}.pub")
    _refuse_existing(paths, overwrite)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_atomic(paths.private_key, private, 0o600)
    _write_atomic(paths.public_key, public + f" medfed-{site_id}\n".encode(), 0o644)
    return paths


def add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    """``medfed certs {all,ca,server,site}``."""
    parser.set_defaults(func=cmd_certs)
    sub = parser.add_subparsers(dest="certs_command", required=True, metavar="{all,ca,server,site}")

    def _common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, type=Path, help="folder to write the files to")
        p.add_argument("--overwrite", action="store_true", help="replace existing files")

    def _hosts(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--host", action="append", default=[], dest="hosts", metavar="NAME_OR_IP",
            help="DNS name or IP address sites use to reach the server (repeatable); "
            f"{' and '.join(DEFAULT_SERVER_HOSTS)} are always included",
        )
        p.add_argument("--server-days", type=int, default=825, help="server certificate validity")

    p_all = sub.add_parser("all", help="CA + server certificate (+ site keys) for a demo; the CA goes to its own "
                           "folder (--ca-out), not the server's")
    _common(p_all)
    _hosts(p_all)
    p_all.add_argument("--ca-out", type=Path, default=None,
                       help=f"folder for the CA ({CA_CERT}, {CA_KEY}), kept offline; not inside --out "
                       f"(default: OUT{CA_DIR_SUFFIX} beside OUT)")
    p_all.add_argument("--site-id", action="append", default=[], dest="site_ids", help="also make this site's key pair (repeatable)")
    p_all.add_argument("--ca-days", type=int, default=3650, help="CA validity")

    p_ca = sub.add_parser("ca", help="create the certificate authority (ca.crt, ca.key)")
    _common(p_ca)
    p_ca.add_argument("--common-name", default="medfed-ca")
    p_ca.add_argument("--ca-days", type=int, default=3650, help="CA validity")

    p_server = sub.add_parser("server", help="create the SuperLink certificate (server.crt, server.key)")
    _common(p_server)
    _hosts(p_server)
    p_server.add_argument("--ca", required=True, type=Path, dest="ca_dir", help="folder with ca.crt and ca.key")

    p_site = sub.add_parser("site", help="create a site's authentication key pair (<site-id>.key, <site-id>.pub)")
    _common(p_site)
    p_site.add_argument("--site-id", required=True)


def default_ca_dir(out_dir: str | Path) -> Path:
    """Where ``medfed certs all`` puts the CA: ``OUT-ca``, beside the server's folder ``OUT``."""
    out = Path(out_dir).resolve()
    return out.with_name(out.name + CA_DIR_SUFFIX)


def cmd_certs(args: argparse.Namespace) -> int:
    """Run ``medfed certs``; prints every file written."""
    hosts = list(dict.fromkeys([*getattr(args, "hosts", []), *DEFAULT_SERVER_HOSTS]))
    if args.certs_command == "all":
        written = _certs_all(args, hosts)
    elif args.certs_command == "ca":
        written = list(create_ca(args.out, args.common_name, args.ca_days, args.overwrite))
    elif args.certs_command == "server":
        written = list(create_server_cert(args.out, args.ca_dir, hosts, args.server_days, args.overwrite)[:2])
    else:
        written = list(create_site_keys(args.out, args.site_id, args.overwrite))
    for path in written:
        emit(str(path))
    return 0


def _certs_all(args: argparse.Namespace, hosts: list[str]) -> list[Path]:
    """CA in ``--ca-out``, server files (with a copy of ca.crt) and site keys in ``--out``."""
    out = Path(args.out)
    ca_dir = Path(args.ca_out) if args.ca_out else default_ca_dir(out)
    if ca_dir.resolve() == out.resolve() or out.resolve() in ca_dir.resolve().parents:
        raise ConfigError(
            f"--ca-out {ca_dir} is inside --out {out}, the folder the server is given: the CA key must "
            f"stay out of it; choose a folder beside it (default {default_ca_dir(out)})"
        )
    targets = [ca_dir / CA_CERT, ca_dir / CA_KEY, out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY]
    for site_id in args.site_ids:
        targets += [out / SITES_DIR / f"{site_id}.key", out / SITES_DIR / f"{site_id}.pub"]
    _refuse_existing(tuple(targets), args.overwrite)  # check every target first: no half-made folder
    written: list[Path] = list(create_ca(ca_dir, days=args.ca_days, overwrite=args.overwrite))
    server = create_server_cert(out, ca_dir, hosts, args.server_days, args.overwrite)
    written += [server.ca_cert, server.cert, server.key]
    for site_id in args.site_ids:
        written += create_site_keys(out / SITES_DIR, site_id, args.overwrite)
    log.info("keep %s offline: %s signs server certificates (`medfed certs server --ca %s`); give the "
             "server only %s", ca_dir, ca_dir / CA_KEY, ca_dir, out)
    if (out / CA_KEY).exists():  # an earlier `certs all` kept the CA key with the server's files
        log.warning("%s is left from an earlier `medfed certs all` and no longer signs this CA: delete it, "
                    "the server's folder must not hold a CA key", out / CA_KEY)
    return written


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise ConfigError(f"days={days!r} must be a whole number of days >= 1")


def _parse_hosts(hosts: list[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise ConfigError("hosts is empty: give the DNS names and IP addresses sites use to reach the server")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _DNS_NAME.match(host):
            raise ConfigError(f"host {host!r} is neither an IP address nor a valid DNS name")
        sans.append(x509.DNSName(host))
    return sans


def _refuse_existing(paths: tuple[Path, ...], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"refusing to overwrite existing {', '.join(existing)}: keep them, choose another "
            "output folder, or pass overwrite=True (`--overwrite`) to replace them"
        )


def _write_private_key_pem(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(path, data, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file created with ``mode``, then rename it over ``path``."""
    atomic_write_bytes(path, lambda f: f.write(data), mode)
