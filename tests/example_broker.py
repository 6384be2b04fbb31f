"""A real mosquitto set up the way Debian's package runs it: a main file that sets what
Debian's /etc/mosquitto/mosquitto.conf sets (pid_file, persistence, persistence_location,
log_dest, include_dir) and one of the examples in examples/mosquitto/ dropped into its
conf.d as the README installs it, with the example's paths and ports pointed at the test's.
Also the test PKI: a CA, a broker certificate, client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .broker import Mosquitto, free_port


def debian_main_conf(workdir: Path, include_dir: Path) -> str:
    """/etc/mosquitto/mosquitto.conf of Debian 12's mosquitto package, its paths in workdir."""
    return (
        # As root, mosquitto would drop to the 'mosquitto' user, which cannot read the
        # test's private temporary directory (password file, persistence).
        ("user root\n" if os.geteuid() == 0 else "")
        + f"pid_file {workdir}/mosquitto.pid\n\n"
        "persistence true\n"
        f"persistence_location {workdir}/\n\n"
        f"log_dest file {workdir}/mosquitto.log\n\n"
        f"include_dir {include_dir}\n")


class DropInMosquitto(Mosquitto):
    """mosquitto -c main.conf, whose include_dir holds `example` (a file of
    examples/mosquitto/, or several: the first as poi-bridge.conf, the others under their
    own names, as the README installs them) with each key of `replace` replaced by its
    value. Each "listener N" of the examples gets a free port on 127.0.0.1, in order:
    `ports`; the first is `port`, which start() waits for."""

    def __init__(self, workdir: Path, example: Path | list[Path],
                 replace: dict[str, str]) -> None:
        super().__init__(workdir)
        examples = [example] if isinstance(example, Path) else list(example)
        self.example, self.replace = examples[0], replace
        self.conf_d = workdir / "conf.d"
        self.ports: list[int] = []
        self.drop_ins: dict[str, str] = {}
        for index, path in enumerate(examples):
            lines = []
            for line in path.read_text().splitlines():
                if line.startswith("listener "):
                    self.ports.append(free_port())
                    line = f"listener {self.ports[-1]} {self.host}"
                lines.append(line)
            self.drop_ins["poi-bridge.conf" if index == 0 else path.name] = \
                "\n".join(lines) + "\n"
        for old, new in replace.items():
            assert any(old in text for text in self.drop_ins.values()), \
                f"{', '.join(p.name for p in examples)} no longer name {old}"
            self.drop_ins = {name: text.replace(old, new)
                             for name, text in self.drop_ins.items()}
        self.port = self.ports[0]

    def write_config(self) -> None:
        self.conf_d.mkdir(exist_ok=True)
        for name, text in self.drop_ins.items():
            (self.conf_d / name).write_text(text)
        self.config_path.write_text(debian_main_conf(self.workdir, self.conf_d))


def broker_tls(pki: Path, cafile: str, certfile: str, keyfile: str) -> dict[str, str]:
    """Replacements for DropInMosquitto: the example's cafile, certfile and keyfile paths
    pointed at `pki`'s CA and broker certificate (make_pki)."""
    return {cafile: str(pki / "ca.pem"), certfile: str(pki / "broker.pem"),
            keyfile: str(pki / "broker.key")}


def make_pki(directory: Path, clients: list[str]) -> None:
    """A CA, a certificate for a broker on 127.0.0.1, one client certificate per name (its
    CN), as NAME.pem / NAME.key."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"{directory.name} test CA")])

    def issue(name: str, key: Any, issuer_key: Any, extension: Any) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(ca_name if name == "ca" else subject)
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(extension, critical=name == "ca")
                .sign(issuer_key, hashes.SHA256()))
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    issue("ca", ca_key, ca_key, x509.BasicConstraints(ca=True, path_length=None))
    for name in ("broker", *clients):
        san = (x509.IPAddress(ipaddress.ip_address("127.0.0.1")) if name == "broker"
               else x509.DNSName(name))
        issue(name, ec.generate_private_key(ec.SECP256R1()), ca_key,
              x509.SubjectAlternativeName([san]))
