"""Where a webhook may be sent (decision 11: no server-side request forgery into graft's own network).

A URL's host is resolved at registration and again before every delivery (a name may be re-pointed after it was
vetted: DNS rebinding); every address it resolves to must be global unicast, or inside a network the operator
allowed (GRAFT_WEBHOOK_ALLOWED_NETWORKS). The sender then connects to the vetted address itself, never resolving
the name a second time.
"""

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from service.errors import InvalidArgument

MAX_URL_CHARS = 2048
SETTING = "GRAFT_WEBHOOK_ALLOWED_NETWORKS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class Target:
    """A webhook URL, checked, with the address its delivery connects to."""

    url: str
    scheme: str
    host: str  # as written (the Host header, and the name TLS checks the certificate against)
    port: int
    path: str  # path and query, as sent in the request line
    address: str  # the vetted IP to connect to


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``GRAFT_WEBHOOK_ALLOWED_NETWORKS``: CIDRs separated by commas (or spaces); empty allows none."""
    networks = []
    for item in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{SETTING}: {item!r} is not a network in CIDR form, e.g. 127.0.0.1/32") from None
    return tuple(networks)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (a literal address resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidArgument(f"webhook host '{host}' does not resolve ({exc}); check the URL") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def why_refused(address: IPAddress) -> str | None:
    """Why ``address`` is no place to send a webhook by default; None for a global unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        inner = why_refused(address.ipv4_mapped)
        return f"an IPv4-mapped {inner.removeprefix('a ')}" if inner else None
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    )
    for kind, hit in checks:
        if hit:
            return f"a {kind} address"
    return None if address.is_global else "a non-global address"


class AddressPolicy:
    """Vets webhook URLs against the operator's allowed networks; ``resolver`` is swappable for tests."""

    def __init__(self, allowed: Sequence[IPNetwork], resolver: Resolver = system_resolver) -> None:
        self.allowed = tuple(allowed)
        self.resolver = resolver

    def check_url(self, url: str) -> SplitResult:
        """The URL's parts, or InvalidArgument: http(s) only, bounded, no credentials, a host."""
        if len(url) > MAX_URL_CHARS:
            raise InvalidArgument(f"the webhook URL has {len(url):,} characters; the limit is {MAX_URL_CHARS:,}")
        if any(ord(c) <= 32 or ord(c) == 127 for c in url):
            raise InvalidArgument("the webhook URL has spaces or control characters; percent-encode them")
        try:
            parts = urlsplit(url)
        except ValueError:  # an unclosed IPv6 bracket, say
            raise InvalidArgument(f"the webhook URL is malformed: {url[:64]!r}") from None
        if parts.scheme not in ("http", "https"):
            raise InvalidArgument(f"a webhook URL must start with http:// or https://, got {url[:64]!r}")
        if parts.username is not None or parts.password is not None:
            raise InvalidArgument("a webhook URL may not hold credentials (user:password@); verify the signature")
        if parts.fragment:
            raise InvalidArgument("a webhook URL may not have a #fragment: it is never sent")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise InvalidArgument(f"the webhook URL's port is not a number from 1 to 65535: {url[:64]!r}")
        if not parts.hostname:
            raise InvalidArgument(f"the webhook URL names no host: {url[:64]!r}")
        return parts

    def vet(self, url: str) -> Target:
        """The URL checked and its host resolved; InvalidArgument naming the address if any answer is refused."""
        parts = self.check_url(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = self.resolver(host, port)
        if not addresses:
            raise InvalidArgument(f"webhook host '{host}' resolves to no address; check the URL")
        for text in addresses:
            self.check_address(host, text)
        path = parts.path or "/"
        return Target(url, parts.scheme, host, port, f"{path}?{parts.query}" if parts.query else path, addresses[0])

    def check_address(self, host: str, text: str) -> None:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
        unmapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        if any(a in network for a in (address, unmapped) if a is not None for network in self.allowed):
            return
        reason = why_refused(address)
        if reason is not None:
            named = f"{text} (what '{host}' resolves to)" if host != text else text
            raise InvalidArgument(
                f"webhooks may not be sent to {named}: {reason}, refused so that no webhook reaches graft's own "
                f"network. An operator can allow it with {SETTING} (a comma-separated CIDR list)",
                address=text,
                setting=SETTING,
            )
