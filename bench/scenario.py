"""Scenario files: a fleet, its server and what happens to it during a run (the regimes study).

One directive per line; ``#`` starts a comment; blank lines are ignored::

    name dynamic                    # the scenario's name (default: the file's stem)
    server gpu-l4                   # the server: a profile (firmware_profiles/, or a .toml file) ...
    server 0.285,0.482              # ... or its rates in TFLOP/s, blocks and LM head
    rounds 12                       # rounds of the run
    device nano-1 jetson-nano       # a device from round 1: its id and its profile (firmware_profiles/)
    at 4 throttle orin-1 0.3        # from round 4 on: orin-1 computes at 30% of its profile (thermal)
    at 6 link laptop-1 2 2 80       # from round 6 on: its link is 2 Mbit/s up, 2 down, 80 ms round trip
    at 8 leave pi-1                 # from round 8 on: pi-1 is gone
    at 8 join laptop-2 laptop       # from round 8 on: a new device, laptop-2, of the laptop class

``throttle 1`` restores full speed; ``link DEVICE profile`` restores the profile's own link. Every error
names the file and the line, and says what was expected.

The server is named absolutely, never as a factor of the machine that runs the scenario, so a scenario
gives the same times on any machine. A lone number (``server 5``, which once meant "5 x this host") is
refused: write both rates (``server 5,5`` for 5 TFLOP/s). A scenario without a ``server`` line needs
one from the command line (``scripts/regimes.py --server``, which also overrides the files' own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from splitft.bench.clock import Server, server_from
from splitft.shared.errors import ConfigError, ScenarioError
from splitft.shared.profiles import DeviceProfile, load_profile

ACTIONS = ("throttle", "link", "leave", "join")


@dataclass(frozen=True)
class Event:
    round: int
    action: str  # one of ACTIONS
    device: str
    compute: float = 1.0  # throttle: the share of the profile's compute
    # link: (uplink Mbit/s, downlink Mbit/s, RTT ms); None: the profile's own
    link: tuple[float, float, float] | None = None
    profile: DeviceProfile | None = None  # join: the new device's class
    line: int = 0

    def describe(self) -> str:
        if self.action == "throttle":
            return f"{self.device} computes at {self.compute:.0%}"
        if self.action == "link":
            if self.link is None:
                return f"{self.device}'s link back to its profile's"
            up, down, rtt = self.link
            return f"{self.device}'s link drops to {up:g}/{down:g} Mbit/s, {rtt:g} ms"
        if self.action == "leave":
            return f"{self.device} leaves"
        assert self.profile is not None
        return f"{self.device} ({self.profile.name}) joins"


@dataclass(frozen=True)
class Scenario:
    name: str
    server_spec: str  # the server as the file names it ('gpu-l4', '0.285,0.482'); '' when it names none
    server: Server | None  # its rates; None when the file names none (the command line must)
    rounds: int
    devices: tuple[tuple[str, DeviceProfile], ...]  # present from round 1
    events: tuple[Event, ...] = field(default_factory=tuple)

    def events_at(self, round_: int) -> list[Event]:
        return [e for e in self.events if e.round == round_]


def _number(word: str, what: str, where: str, *, integer: bool = False, positive: bool = True) -> float:
    try:
        value = int(word) if integer else float(word)
    except ValueError:
        raise ScenarioError(f"{where}: {what} must be {'a whole' if integer else 'a'} number, got {word!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or (positive and value <= 0):
        raise ScenarioError(f"{where}: {what} must be a positive number, got {word!r}")
    return value


def parse_server(spec: str) -> Server:
    """The server a scenario's ``server`` line or the command line names: a profile name or ``.toml`` file,
    or ``blocks,head`` in TFLOP/s. Raises :class:`ScenarioError` saying what is expected."""
    words = spec.split(",")
    numbers = all(_is_number(w) for w in words)
    if len(words) == 1 and numbers:
        raise ScenarioError(
            f"the server {spec!r} is a lone number: name a profile (e.g. gpu-l4) or give the rates in TFLOP/s, "
            f"blocks and head (e.g. 0.285,0.482; '{spec},{spec}' for {spec} TFLOP/s on both); a server is no "
            "longer a factor of this host's speed"
        )
    if len(words) > 1 and (len(words) != 2 or not numbers):
        raise ScenarioError(f"the server's rates must be two numbers in TFLOP/s, 'blocks,head', got {spec!r}")
    try:
        return server_from(spec)
    except ConfigError as exc:
        raise ScenarioError(f"the server {spec!r}: {exc}") from None


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _profile(word: str, where: str) -> DeviceProfile:
    try:
        return load_profile(word)
    except ConfigError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """Read a scenario from its text; ``source`` names it in errors (a path, usually)."""
    name = Path(source).stem if source != "<scenario>" else "scenario"
    server_spec, server, rounds = "", None, 0
    devices: dict[str, DeviceProfile] = {}
    events: list[Event] = []
    present: set[str] = set()  # devices present at the latest event's round, to check leave/throttle/link
    last_round = 1
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source} line {number}"
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        key, args = words[0], words[1:]
        if key == "name":
            if len(args) != 1:
                raise ScenarioError(f"{where}: 'name' takes one word, e.g. 'name dynamic'")
            name = args[0]
        elif key == "server":
            if len(args) != 1:
                raise ScenarioError(
                    f"{where}: 'server' takes a profile name or 'blocks,head' in TFLOP/s, e.g. 'server gpu-l4' "
                    "or 'server 0.285,0.482'"
                )
            try:
                server_spec, server = args[0], parse_server(args[0])
            except ScenarioError as exc:
                raise ScenarioError(f"{where}: {exc}") from None
        elif key == "rounds":
            if len(args) != 1:
                raise ScenarioError(f"{where}: 'rounds' takes one whole number, e.g. 'rounds 12'")
            rounds = int(_number(args[0], "rounds", where, integer=True))
        elif key == "device":
            if events:
                raise ScenarioError(
                    f"{where}: devices come before the events (a device that arrives later: 'at N join')"
                )
            if len(args) != 2:
                raise ScenarioError(f"{where}: 'device' takes an id and a profile, e.g. 'device nano-1 jetson-nano'")
            if args[0] in seen:
                raise ScenarioError(f"{where}: device {args[0]!r} is declared twice")
            devices[args[0]] = _profile(args[1], where)
            seen.add(args[0])
            present.add(args[0])
        elif key == "at":
            events.append(_event(args, where, number, present, seen, last_round))
            last_round = events[-1].round
        else:
            raise ScenarioError(f"{where}: unknown directive {key!r} (expected name, server, rounds, device or at)")
    if not devices:
        raise ScenarioError(f"{source}: no devices (add lines like 'device nano-1 jetson-nano')")
    if rounds < 1:
        raise ScenarioError(f"{source}: no 'rounds N' line")
    for e in events:
        if e.round > rounds:
            raise ScenarioError(f"{source} line {e.line}: round {e.round} is after the last round ({rounds})")
    return Scenario(name, server_spec, server, rounds, tuple(devices.items()), tuple(events))


def _event(args: list[str], where: str, number: int, present: set[str], seen: set[str], last_round: int) -> Event:
    usage = "'at ROUND ACTION DEVICE ...' with ACTION one of " + ", ".join(ACTIONS)
    if len(args) < 3:
        raise ScenarioError(f"{where}: expected {usage}")
    round_ = int(_number(args[0], "the event's round", where, integer=True))
    if round_ < 2:
        raise ScenarioError(f"{where}: events start at round 2 or later (round 1 is the fleet as declared)")
    if round_ < last_round:
        raise ScenarioError(f"{where}: events must be in round order (round {round_} after round {last_round})")
    action, device, rest = args[1], args[2], args[3:]
    if action not in ACTIONS:
        raise ScenarioError(f"{where}: unknown action {action!r}; expected {usage}")
    if action == "join":
        if len(rest) != 1:
            raise ScenarioError(
                f"{where}: 'join' takes the new device's id and profile, e.g. 'at 8 join laptop-2 laptop'"
            )
        if device in seen:
            raise ScenarioError(f"{where}: device {device!r} already exists; a device that joins needs a new id")
        seen.add(device)
        present.add(device)
        return Event(round_, action, device, profile=_profile(rest[0], where), line=number)
    if device not in present:
        known = ", ".join(sorted(present)) or "none"
        raise ScenarioError(f"{where}: no device {device!r} is in the fleet at round {round_} (present: {known})")
    if action == "leave":
        if rest:
            raise ScenarioError(f"{where}: 'leave' takes only the device, e.g. 'at 8 leave pi-1'")
        present.discard(device)
        return Event(round_, action, device, line=number)
    if action == "throttle":
        if len(rest) != 1:
            raise ScenarioError(f"{where}: 'throttle' takes the share of compute left, e.g. 'at 4 throttle orin-1 0.3'")
        share = _number(rest[0], "the compute share", where)
        if share > 1:
            raise ScenarioError(f"{where}: the compute share is at most 1 (1 = the profile's speed), got {share:g}")
        return Event(round_, action, device, compute=share, line=number)
    if rest == ["profile"]:
        return Event(round_, action, device, link=None, line=number)
    if len(rest) != 3:
        raise ScenarioError(
            f"{where}: 'link' takes uplink and downlink Mbit/s and the RTT in ms (e.g. 'at 6 link laptop-1 2 2 80'), "
            "or 'profile'"
        )
    up, down = _number(rest[0], "the uplink", where), _number(rest[1], "the downlink", where)
    rtt = _number(rest[2], "the RTT", where, positive=False)
    if rtt < 0:
        raise ScenarioError(f"{where}: the RTT must be >= 0 ms, got {rest[2]!r}")
    return Event(round_, action, device, link=(up, down, rtt), line=number)


def load_scenario(path: Path) -> Scenario:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ScenarioError(f"scenario file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario file {path}: {exc}") from None
    return parse_scenario(text, str(path))
