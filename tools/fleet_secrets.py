"""Make the secrets of a SplitFT fleet: a throwaway CA, the broker's TLS certificate, one broker password
per member, the broker ACL, and the job key that signs every message.

    python scripts/fleet_secrets.py --out fleet --devices jetson-1,jetson-2,laptop \\
        --hosts broker.example.org,10.0.0.5

writes into ``fleet/`` (secrets with mode 0600, the folder 0700):

    ca.crt ca.key             the fleet's own CA (keep ca.key offline once the certificates are made)
    broker.crt broker.key     the broker's certificate, for the names and addresses of --hosts
    passwd                    Mosquitto password file (hashed by mosquitto_passwd), one user per member
    acl.conf                  tools/mosquitto/acl.conf for this coordinator user name (and --job)
    passwords.json            {"user": "password"} of every member, to hand each one its own
    credentials/USER.env      SPLITFT_USERNAME / SPLITFT_PASSWORD (and SPLITFT_AGENT_ID) of one member,
                              ready for a systemd EnvironmentFile
    job.key                   32 random bytes as hex: the message authentication key of the job
    clients/USER.crt .key     with --client-certs: a client certificate per member (CN = user name)
    fleet.json                what was made, for humans and for load_fleet_secrets() (no secrets in it)

Device user names are the agent ids (``splitft-agent join --id``): the ACL grants a device its own
``agents/<id>/...`` topics through ``%u``. Needs the ``openssl`` and ``mosquitto_passwd`` commands.

From Python: ``secrets = make_fleet_secrets(folder, ["a1", "a2"])``; ``secrets.password("a1")``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets as random_source
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from splitft.shared.cli_options import run_app
from splitft.shared.errors import SecretsError
from splitft.shared.wire.keys import write_key, write_private

HERE = Path(__file__).resolve().parent
ACL_EXAMPLE = HERE / "mosquitto" / "acl.conf"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the agent and job names of splitft.shared.wire.topics

# A minimal OpenSSL configuration: the system's openssl.cnf differs between distributions.
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
_LEAF_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class FleetSecrets:
    """The files of a fleet's secrets (see the module docstring) and the members' passwords."""

    folder: Path
    coordinator: str
    devices: tuple[str, ...]
    hosts: tuple[str, ...]
    passwords: dict[str, str] = field(repr=False)
    client_certs: bool = False

    @property
    def users(self) -> tuple[str, ...]:
        return (self.coordinator, *self.devices)

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def broker_cert(self) -> Path:
        return self.folder / "broker.crt"

    @property
    def broker_key(self) -> Path:
        return self.folder / "broker.key"

    @property
    def password_file(self) -> Path:
        return self.folder / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.folder / "acl.conf"

    @property
    def passwords_json(self) -> Path:
        return self.folder / "passwords.json"

    @property
    def job_key(self) -> Path:
        return self.folder / "job.key"

    def env_file(self, user: str) -> Path:
        return self.folder / "credentials" / f"{user}.env"

    def client_cert(self, user: str) -> tuple[Path, Path]:
        """A member's client certificate and key (made with ``client_certs``)."""
        return self.folder / "clients" / f"{user}.crt", self.folder / "clients" / f"{user}.key"

    def password(self, user: str) -> str:
        try:
            return self.passwords[user]
        except KeyError:
            raise SecretsError(f"no password for {user!r}; the fleet's users are {', '.join(self.users)}") from None


# --------------------------------------------------------------------------- helpers


def require_tool(name: str, hint: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if not found:
        raise SecretsError(f"the {name!r} command is not installed ({hint})")
    return found


def _run(args: Sequence[str], what: str) -> None:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        raise SecretsError(f"{what}: cannot run {args[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise SecretsError(f"{what}: {args[0]} did not finish within 120 s") from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise SecretsError(f"{what} failed ({Path(args[0]).name} exit {done.returncode}): {output}")


def _subject_alt_names(hosts: Sequence[str]) -> str:
    names = []
    for host in hosts:
        try:
            names.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,251}[A-Za-z0-9])?", host):
                raise SecretsError(f"{host!r} is neither an IP address nor a DNS name") from None
            names.append(f"DNS:{host}")
    return ", ".join(names)


def check_names(devices: Sequence[str], coordinator: str) -> tuple[str, ...]:
    for name in (coordinator, *devices):
        if not NAME.fullmatch(name):
            raise SecretsError(f"user name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . - (an agent id)")
    if coordinator in devices:
        raise SecretsError(f"a device cannot be named {coordinator!r}, the coordinator's user name")
    if len(set(devices)) != len(devices):
        raise SecretsError("device ids must be unique")
    if not devices:
        raise SecretsError("give at least one device id")
    return tuple(devices)


def render_acl(coordinator: str = "coordinator", job: str | None = None, example: Path = ACL_EXAMPLE) -> str:
    """The example ACL with this coordinator user name, and with ``job`` every job segment narrowed to it."""
    text = example.read_text(encoding="utf-8")
    if not re.search(r"^user coordinator$", text, flags=re.M):
        raise SecretsError(f"{example} has no 'user coordinator' line to render")
    text = re.sub(r"^user coordinator$", f"user {coordinator}", text, flags=re.M)
    if job is not None:
        if not NAME.fullmatch(job):
            raise SecretsError(f"job name {job!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
        text = re.sub(r"^((?:topic|pattern) \w+ splitft/v1/)(\+|#)", lambda m: m[1] + job + ("/#" if m[2] == "#" else ""),
                      text, flags=re.M)  # fmt: skip
    return text


# --------------------------------------------------------------------------- certificates


def _make_ca(openssl: str, folder: Path, days: int, work: Path) -> None:
    _run(
        [openssl, "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.crt"), "-days", str(days), "-sha256",
         "-subj", f"/CN=SplitFT fleet CA {random_source.token_hex(4)}", "-config", str(work / "openssl.cnf"),
         "-extensions", "v3_ca"],
        "making the CA",
    )  # fmt: skip


def _issue(
    openssl: str, folder: Path, name: str, cn: str, ext_text: str, days: int, work: Path, key: Path, cert: Path
) -> None:
    """A key and a certificate for ``cn`` signed by the CA in ``folder``."""
    csr, ext = work / f"{name}.csr", work / f"{name}.ext"
    ext.write_text(ext_text)
    _run(
        [openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}", "-config", str(work / "openssl.cnf")],
        f"making the key of {cn}",
    )  # fmt: skip
    _run(
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(folder / "ca.crt"), "-CAkey", str(folder / "ca.key"),
         "-CAcreateserial", "-CAserial", str(work / "ca.srl"), "-out", str(cert), "-days", str(days), "-sha256",
         "-extfile", str(ext)],
        f"signing the certificate of {cn}",
    )  # fmt: skip
    os.chmod(key, 0o600)


# --------------------------------------------------------------------------- the whole set


def make_fleet_secrets(
    out: Path,
    devices: Sequence[str],
    coordinator: str = "coordinator",
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    job: str | None = None,
    days: int = 825,
    client_certs: bool = False,
    force: bool = False,
) -> FleetSecrets:
    """Make every file of a fleet's secrets in ``out`` (see the module docstring)."""
    devices = check_names(devices, coordinator)
    if not hosts:
        raise SecretsError("give at least one host name or address for the broker certificate")
    san = _subject_alt_names(hosts)
    if not 1 <= days <= 3650:
        raise SecretsError(f"days must lie in 1..3650, got {days}")
    acl = render_acl(coordinator, job)  # checks the job name before anything is written
    openssl = require_tool("openssl", "apt-get install openssl")
    passwd_tool = require_tool("mosquitto_passwd", "apt-get install mosquitto (it ships mosquitto_passwd)")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise SecretsError(
            f"{out} is not empty; pass --force to replace the secrets in it (all members need the new ones)"
        )
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    users = (coordinator, *devices)
    passwords = {user: random_source.token_urlsafe(24) for user in users}  # [A-Za-z0-9_-]: never a ':'

    with tempfile.TemporaryDirectory(prefix="splitft-secrets-") as tmp:
        work = Path(tmp)
        (work / "openssl.cnf").write_text(_OPENSSL_CNF)
        _make_ca(openssl, out, days, work)
        os.chmod(out / "ca.key", 0o600)
        _issue(openssl, out, "broker", hosts[0], _LEAF_EXT.format(usage="serverAuth") + f"subjectAltName = {san}\n",
               days, work, out / "broker.key", out / "broker.crt")  # fmt: skip
        if client_certs:
            (out / "clients").mkdir(mode=0o700, exist_ok=True)
            for user in users:
                _issue(openssl, out, f"client-{user}", user, _LEAF_EXT.format(usage="clientAuth"), days, work,
                       out / "clients" / f"{user}.key", out / "clients" / f"{user}.crt")  # fmt: skip
        # mosquitto_passwd -U hashes a file of user:password lines in place; the passwords never appear on
        # a command line (where other users of the machine could read them in /proc).
        write_private(out / "passwd", "".join(f"{u}:{passwords[u]}\n" for u in users), replace=True)
        _run([passwd_tool, "-U", str(out / "passwd")], "hashing the password file")
        os.chmod(out / "passwd", 0o600)

    write_private(out / "passwords.json", json.dumps(passwords, indent=2) + "\n", replace=True)
    (out / "credentials").mkdir(mode=0o700, exist_ok=True)
    for user in users:
        lines = [f"SPLITFT_USERNAME={user}", f"SPLITFT_PASSWORD={passwords[user]}"]
        if user != coordinator:
            lines.append(f"SPLITFT_AGENT_ID={user}")
        write_private(out / "credentials" / f"{user}.env", "\n".join(lines) + "\n", replace=True)
    os.chmod(out / "credentials", 0o700)
    (out / "acl.conf").write_text(acl, encoding="utf-8")
    write_key(out / "job.key", replace=True)
    manifest = {
        "coordinator": coordinator,
        "devices": list(devices),
        "hosts": list(hosts),
        "job": job,
        "days": days,
        "client_certs": client_certs,
        "files": {
            "ca_cert": "ca.crt", "ca_key": "ca.key", "broker_cert": "broker.crt", "broker_key": "broker.key",
            "password_file": "passwd", "acl_file": "acl.conf", "passwords": "passwords.json", "job_key": "job.key",
        },
    }  # fmt: skip
    (out / "fleet.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return FleetSecrets(out, coordinator, devices, tuple(hosts), passwords, client_certs)


def load_fleet_secrets(folder: Path) -> FleetSecrets:
    """The secrets :func:`make_fleet_secrets` wrote to ``folder``."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "fleet.json").read_text(encoding="utf-8"))
        passwords = json.loads((folder / "passwords.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SecretsError(f"{folder} holds no fleet secrets (fleet.json, passwords.json): {exc}") from exc
    return FleetSecrets(
        folder,
        manifest["coordinator"],
        tuple(manifest["devices"]),
        tuple(manifest["hosts"]),
        passwords,
        bool(manifest.get("client_certs", False)),
    )


app = typer.Typer(add_completion=False)


@app.command(help=__doc__)
def make(
    out: Annotated[Path, typer.Option("--out", help="folder to write (created, mode 0700)")],
    devices: Annotated[str, typer.Option("--devices", help="comma-separated device ids (= agent ids = user names)")],
    coordinator: Annotated[str, typer.Option("--coordinator", help="the coordinator's user name")] = "coordinator",
    hosts: Annotated[
        str,
        typer.Option(
            "--hosts",
            help="comma-separated DNS names and IP addresses of the broker, as agents connect to it "
            "(the first is also the certificate's CN)",
        ),
    ] = ",".join(DEFAULT_HOSTS),
    job: Annotated[
        str | None,
        typer.Option("--job", help="narrow the ACL to this one job (default: every job under splitft/v1)"),
    ] = None,
    days: Annotated[int, typer.Option("--days", help="validity of the certificates")] = 825,
    client_certs: Annotated[
        bool, typer.Option("--client-certs", help="also issue a client certificate per member")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="replace the secrets in a folder that is not empty")] = False,
) -> int:
    try:
        made = make_fleet_secrets(
            out,
            [d.strip() for d in devices.split(",") if d.strip()],
            coordinator,
            [h.strip() for h in hosts.split(",") if h.strip()],
            job=job,
            days=days,
            client_certs=client_certs,
            force=force,
        )
    except SecretsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the secrets of {len(made.devices)} devices and {made.coordinator!r} to {made.folder}:")
    print(f"  broker: {made.broker_cert}, {made.broker_key}, {made.password_file}, {made.acl_file}, CA {made.ca_cert}")
    print(f"  every member: {made.ca_cert} and {made.job_key}; each its own {made.folder / 'credentials'}/USER.env")
    print(f"  keep {made.ca_key} offline, and {made.passwords_json} wherever you keep secrets")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/fleet_secrets.py``: the command line of :func:`make_fleet_secrets`; returns the exit code."""
    return run_app(app, argv)
