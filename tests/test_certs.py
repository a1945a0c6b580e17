"""medfed.common.certs: CA, server certificate and site keys in the formats Flower 1.41 reads."""

from __future__ import annotations

import argparse
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from medfed.common.certs import (
    add_certs_arguments,
    cmd_certs,
    create_ca,
    create_server_cert,
    create_site_keys,
)
from medfed.common.errors import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def server_certs(tmp_path: Path):
    ca = create_ca(tmp_path / "ca")
    server = create_server_cert(tmp_path / "server", tmp_path / "ca", ["127.0.0.1", "localhost", "fl.example.org"])
    return ca, server


def test_server_cert_verifies_against_ca(server_certs) -> None:
    ca_paths, server_paths = server_certs
    ca = x509.load_pem_x509_certificate(ca_paths.cert.read_bytes())
    cert = x509.load_pem_x509_certificate(server_paths.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises on a wrong issuer or signature
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    # the CA certificate travels with the server files: `--certs DIR` is self-contained
    assert server_paths.ca_cert.read_bytes() == ca_paths.cert.read_bytes()


def test_server_cert_sans_and_key_match(server_certs) -> None:
    _, server_paths = server_certs
    cert = x509.load_pem_x509_certificate(server_paths.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    key = serialization.load_pem_private_key(server_paths.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_site_keys_are_openssh_ecdsa_p384(tmp_path: Path) -> None:
    paths = create_site_keys(tmp_path, "site-a")
    assert paths.private_key.name == "site-a.key" and paths.public_key.name == "site-a.pub"
    private = serialization.load_ssh_private_key(paths.private_key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(paths.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert paths.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_site_public_key_is_what_flower_register_accepts(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    paths = create_site_keys(tmp_path, "site-b")
    assert try_load_public_key(paths.public_key)  # raises / exits on a key Flower refuses


def test_private_keys_are_0600_and_certs_public(server_certs, tmp_path: Path) -> None:
    ca_paths, server_paths = server_certs
    site = create_site_keys(tmp_path / "keys", "site-a")
    for private in (ca_paths.key, server_paths.key, site.private_key):
        assert _mode(private) == 0o600, private
    for public in (ca_paths.cert, server_paths.cert, site.public_key):
        assert _mode(public) == 0o644, public
    leftovers = [p for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []


@pytest.mark.parametrize("make", ["ca", "server", "site"])
def test_refuses_to_overwrite_unless_asked(tmp_path: Path, make: str) -> None:
    create_ca(tmp_path / "ca")
    out = tmp_path / "out"
    makers = {
        "ca": lambda **kw: create_ca(out, **kw),
        "server": lambda **kw: create_server_cert(out, tmp_path / "ca", ["127.0.0.1"], **kw),
        "site": lambda **kw: create_site_keys(out, "site-a", **kw),
    }
    first = makers[make]()
    before = first[1].read_bytes()
    with pytest.raises(ConfigError, match="overwrite") as info:
        makers[make]()
    assert isinstance(info.value, ValueError)
    assert first[1].read_bytes() == before
    makers[make](overwrite=True)
    assert first[1].read_bytes() != before


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: create_server_cert(d / "s", d / "no-ca", ["127.0.0.1"]), "medfed certs ca"),
        (lambda d: create_server_cert(d / "s", d / "ca", []), "hosts is empty"),
        (lambda d: create_server_cert(d / "s", d / "ca", ["bad host!"]), "neither an IP"),
        (lambda d: create_ca(d / "x", days=0), "days"),
        (lambda d: create_site_keys(d, "../evil"), "site-id"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, call, match: str) -> None:
    create_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match=match):
        call(tmp_path)


def test_cli_all_makes_every_file_and_always_includes_localhost(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_certs_arguments(parser)
    out = tmp_path / "certs"
    args = parser.parse_args(["all", "--out", str(out), "--host", "10.1.2.3", "--site-id", "site-a"])
    assert args.func(args) == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # the server's folder: no CA key in it (deploy/README: keep ca.key offline)
    assert names == ["ca.crt", "server.crt", "server.key", "sites/site-a.key", "sites/site-a.pub"]
    ca_dir = tmp_path / "certs-ca"
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]
    assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert str(out / "server.crt") in capsys.readouterr().out
    with pytest.raises(ConfigError, match="overwrite"):  # checked before anything is written
        cmd_certs(args)


def test_cli_all_keeps_the_ca_key_out_of_the_server_folder_and_certs_server_finds_it(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_certs_arguments(parser)
    out, offline = tmp_path / "server-certs", tmp_path / "offline" / "ca"
    args = parser.parse_args(["all", "--out", str(out), "--ca-out", str(offline)])
    assert args.func(args) == 0
    assert not list(out.rglob("ca.key")) and (offline / "ca.key").is_file()
    assert _mode(offline / "ca.key") == 0o600
    # later: a new server certificate signed by that CA, found where `certs all` put it
    renew = parser.parse_args(["server", "--ca", str(offline), "--out", str(tmp_path / "renewed"),
                               "--host", "fl.example.org"])
    assert renew.func(renew) == 0
    ca = x509.load_pem_x509_certificate((offline / "ca.crt").read_bytes())
    x509.load_pem_x509_certificate((tmp_path / "renewed" / "server.crt").read_bytes()).verify_directly_issued_by(ca)
    # the default CA folder of `certs all` works the same way
    args = parser.parse_args(["all", "--out", str(tmp_path / "demo")])
    assert args.func(args) == 0
    renew = parser.parse_args(["server", "--ca", str(tmp_path / "demo-ca"), "--out", str(tmp_path / "r2")])
    assert renew.func(renew) == 0


@pytest.mark.parametrize("inside", [".", "ca", "sub/ca"])
def test_cli_all_refuses_a_ca_folder_inside_the_server_folder(tmp_path: Path, inside: str) -> None:
    parser = argparse.ArgumentParser()
    add_certs_arguments(parser)
    out = tmp_path / "certs"
    args = parser.parse_args(["all", "--out", str(out), "--ca-out", str(out / inside)])
    with pytest.raises(ConfigError, match="--ca-out .* is inside --out"):
        cmd_certs(args)
    assert not out.exists()  # nothing written
