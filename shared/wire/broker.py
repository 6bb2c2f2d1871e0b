"""How a member reaches the broker: :class:`BrokerSettings`, and :func:`broker_settings` that builds them from the
command-line options (every error names its option). No network here; :class:`~splitft.shared.wire.link.Link`
connects with them, and tells their :class:`LinkObserver`, if any, of every message."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from splitft.shared.errors import ConfigError
from splitft.shared.wire.codec import Limits
from splitft.shared.wire.keys import MIN_KEY_BYTES, load_key

#: the MQTT versions a member speaks
PROTOCOLS = ("5", "3.1.1")
#: URL schemes and their default ports
SCHEMES = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


def _is_number(value: Any) -> bool:
    """An int or a float, but not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LinkObserver(Protocol):
    """Told of every MQTT message a link publishes or receives: a benchmark's counters (scripts/bench_load.py)."""

    def on_publish(self, topic: str, size: int, seconds: float) -> None:
        """A message of ``size`` bytes went out on ``topic`` (each chunk of a large one counts); awaiting the
        publish took ``seconds`` (QoS 1: until the broker's PUBACK)."""

    def on_receive(self, topic: str, size: int) -> None:
        """A message of ``size`` bytes came in on ``topic``, before any check."""


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the broker, how messages are authenticated, and the limits of this end of the link.

    ``mqtts://`` URLs connect over TLS: ``ca_file`` is the CA that signed the broker's certificate
    (default: the system's), ``cert_file``/``key_file`` a client certificate where the broker asks
    for one. ``auth_key`` (at least 32 bytes, the same for every member of the job) signs every
    message and refuses those not signed with it (see :func:`splitft.shared.wire.envelope.check_tag`).
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False  # skip the broker host name check (a certificate for another name); never in the field
    auth_key: bytes | None = field(default=None, repr=False)
    auth_window_s: float = 300.0  # how far a message's timestamp may be from the receiver's clock
    # Send small messages at once: with Nagle's algorithm a publish waits for the ACK of the previous small
    # segment, which the broker's delayed ACK holds up to 40 ms (scripts/bench_load.py measures it).
    tcp_nodelay: bool = True
    client_id: str | None = None  # MQTT client id (for broker ACLs on %c); default: the member name + a session suffix
    protocol: str = "5"  # "5", or "3.1.1" for brokers without v5 (the embedded amqtt)
    keepalive_s: int = 30
    # MQTT v5: how long the broker keeps this member's session after its connection drops: its subscriptions,
    # and the QoS 1 messages sent to it meanwhile, delivered when it is back. 0: none (a member that other
    # members re-send to when it announces itself again: the coordinator's rank 0, the agents).
    session_expiry_s: int = 0
    connect_timeout_s: float = 30.0  # first connection; later ones retry until the link closes
    publish_wait_s: float = 60.0  # how long a publish waits for a lost connection to come back
    publish_timeout_s: float = 10.0  # per publish, plus the time the payload needs at min_bandwidth
    min_bandwidth_bytes_s: float = 250_000.0
    max_payload_bytes: int = 1_000_000  # larger payloads are chunked (EMQX's default packet cap is 1 MB)
    reassembly_timeout_s: float = 120.0
    # Memory bounds of what waits: received messages not yet taken by the runtime (decoded bytes, per sender
    # and in total; a sender holding nothing may always queue one message), and partial chunked messages.
    max_queued_bytes_per_sender: int = 64 << 20
    max_queued_bytes: int = 1 << 30
    max_reassembly_bytes: int = 512 << 20
    backoff_min_s: float = 0.2
    backoff_max_s: float = 10.0
    limits: Limits = field(default_factory=Limits)
    # Instrumentation, not a setting: every Link made with these settings reports its messages to it (None: nobody).
    # Harnesses count the traffic of members they do not construct the links of, such as a coordinator's.
    observer: LinkObserver | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in SCHEMES or not parsed.hostname:
            raise ConfigError(f"broker url must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {self.url!r}")
        try:
            parsed.port  # noqa: B018 (a bad port raises here)
        except ValueError as exc:
            raise ConfigError(f"broker url {self.url!r} has a bad port") from exc
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"broker {name.replace('_', ' ')} {path} does not exist")
            if path is not None and not self.tls:
                raise ConfigError(f"{name} is set but the broker url {self.url!r} is not mqtts://")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs both cert_file and key_file")
        if self.auth_key is not None and len(self.auth_key) < MIN_KEY_BYTES:
            raise ConfigError(f"the message authentication key must have at least {MIN_KEY_BYTES} bytes")
        if not 0 < self.auth_window_s < 1e6:
            raise ConfigError(f"auth_window_s must be positive, got {self.auth_window_s}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"broker protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if type(self.session_expiry_s) is not int or not 0 <= self.session_expiry_s < 1 << 32:
            raise ConfigError(f"session_expiry_s must be an integer of seconds, got {self.session_expiry_s!r}")
        if self.max_payload_bytes < 4096:
            raise ConfigError(f"max_payload_bytes must be at least 4096, got {self.max_payload_bytes}")
        for name in ("max_queued_bytes_per_sender", "max_queued_bytes", "max_reassembly_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.reassembly_timeout_s < 1e6:
            raise ConfigError(f"reassembly_timeout_s must be positive, got {self.reassembly_timeout_s}")

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or ""

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or SCHEMES[parsed.scheme]

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme in ("mqtts", "ssl")


def broker_settings(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    auth_key_file: Path | None = None,
    auth_window_s: float = 300.0,
    client_id: str | None = None,
    protocol: str = "5",
    connect_timeout_s: float = 30.0,
) -> BrokerSettings:
    """The broker connection from the command-line options; every error names the option and the path.

    Checks the files exist (and are files) and reads the message authentication key before anything
    connects, so that a typo fails at once instead of as a refused TLS handshake or refused messages.
    """
    files = {"--ca-file": ca_file, "--cert-file": cert_file, "--key-file": key_file, "--auth-key-file": auth_key_file}
    for option, path in files.items():
        if path is None:
            continue
        if not Path(path).exists():
            raise ConfigError(f"{option} {path} does not exist")
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path} is not a file")
    if (ca_file or cert_file or key_file) and urlparse(url).scheme in ("mqtt", "tcp"):
        raise ConfigError(
            f"--ca-file, --cert-file and --key-file are for TLS: the broker url must be mqtts://, got {url!r}"
        )
    if (cert_file is None) != (key_file is None):
        raise ConfigError("a client certificate needs both --cert-file and --key-file")
    if not (_is_number(auth_window_s) and 0 < auth_window_s < 1e6):
        raise ConfigError(f"--auth-window must be a positive number of seconds, got {auth_window_s!r}")
    if not (_is_number(connect_timeout_s) and 0 < connect_timeout_s < 1e6):
        raise ConfigError(f"--connect-timeout must be a positive number of seconds, got {connect_timeout_s!r}")
    try:
        auth_key = None if auth_key_file is None else load_key(auth_key_file)
    except ConfigError as exc:
        raise ConfigError(f"--auth-key-file: {exc}") from exc
    return BrokerSettings(
        url=url,
        username=username,
        password=password,
        ca_file=None if ca_file is None else str(ca_file),
        cert_file=None if cert_file is None else str(cert_file),
        key_file=None if key_file is None else str(key_file),
        auth_key=auth_key,
        auth_window_s=auth_window_s,
        client_id=client_id,
        protocol=protocol,
        connect_timeout_s=connect_timeout_s,
    )
