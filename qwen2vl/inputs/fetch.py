"""Getting media bytes from where a conversation points: local paths, file:// and http(s):// URLs, data URIs.

Everything goes through one `MediaPolicy`, which the library, CLI and server configure differently (the library
trusts its caller; a server should deny local files and remote URLs unless told otherwise).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


@dataclass(frozen=True)
class MediaPolicy:
    """What media sources may be read, and how much of them."""
    allow_local: bool = True  # plain paths and file:// URLs
    local_roots: tuple[Path, ...] | None = None  # if set, local files must resolve (symlinks too) inside one of these
    allow_remote: bool = True  # http:// and https:// URLs
    allowed_domains: tuple[str, ...] | None = None  # if set, remote hosts must be one of these (or a subdomain)
    block_private_addresses: bool = False  # refuse hosts resolving to loopback/private/link-local, on every redirect
    trusted_hosts: tuple[str, ...] = ()  # exempt from that check (e.g. an internal media store)
    allow_data_uri: bool = True  # data:...;base64, URIs and raw base64 strings
    max_bytes: int = 512 * 1024 * 1024  # per fetched file
    timeout: float = 30.0  # seconds, per remote request
    max_image_pixels: int = 178_956_970  # refuse images above this before decoding (PIL's own bomb limit)

    @classmethod
    def deny_all_but_data(cls, **overrides) -> "MediaPolicy":
        """The safe default for servers: only inline data URIs."""
        return cls(**{"allow_local": False, "allow_remote": False, **overrides})


@dataclass
class Source:
    """Resolved media: either a local path or in-memory bytes."""
    path: Path | None = None
    data: bytes | None = None


def resolve_source(ref: str, policy: MediaPolicy, kind: str = "image") -> Source:
    """A string reference -> a local Path or bytes, enforcing the policy. Raises InputError."""
    if ref.startswith("data:"):
        if not policy.allow_data_uri:
            raise InputError("data URIs are not allowed")
        header, sep, payload = ref.partition(",")
        if not sep or ";base64" not in header:
            raise InputError("data URI is not base64-encoded (expected data:<type>;base64,<data>)")
        return Source(data=_b64decode(payload))
    if ref.startswith(("http://", "https://")):
        return Source(data=fetch_url(ref, policy))
    if ref.startswith("file://"):
        return Source(path=_local(urllib.parse.unquote(ref[len("file://"):]), policy))
    if "://" in ref[:16]:
        raise InputError(f"unsupported URL scheme in {ref[:40]!r} (use a path, file://, http(s):// or data:)")
    if len(ref) > 512 and _BASE64_RE.match(ref[:4096]) and policy.allow_data_uri:
        return Source(data=_b64decode(ref))  # raw base64, as qwen-vl-utils users sometimes pass
    return Source(path=_local(ref, policy))


def _b64decode(payload: str) -> bytes:
    payload = "".join(payload.split())
    urlsafe = "-" in payload or "_" in payload
    try:
        return base64.b64decode(payload, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"invalid base64 data: {e}") from None


def _local(path: str, policy: MediaPolicy) -> Path:
    if not policy.allow_local:
        raise InputError("local files are not allowed here")
    p = Path(path).expanduser()
    if policy.local_roots is not None:
        real = p.resolve()
        if not any(real.is_relative_to(root.resolve()) for root in policy.local_roots):
            raise InputError(f"{path!r} is outside the allowed media directories")
    if not p.exists():
        raise InputError(f"file not found: {path}")
    if not p.is_file():
        raise InputError(f"not a file: {path}")
    if p.stat().st_size > policy.max_bytes:
        raise InputError(f"file {path} is larger than the limit of {policy.max_bytes} bytes")
    return p


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: MediaPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_remote(newurl, self.policy)  # every hop obeys the policy
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def check_remote(url: str, policy: MediaPolicy) -> None:
    if not policy.allow_remote:
        raise InputError("remote URLs are not allowed here")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"unsupported URL {url[:80]!r}")
    host = parts.hostname.lower().rstrip(".")
    if policy.allowed_domains is not None and not any(host == d or host.endswith("." + d)
                                                      for d in policy.allowed_domains):
        raise InputError(f"host {host!r} is not in the allowed domains")
    if policy.block_private_addresses and host not in policy.trusted_hosts:
        try:
            infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
        except socket.gaierror as e:
            raise InputError(f"cannot resolve host {host!r}: {e}") from None
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            if not ip.is_global or ip.is_multicast:
                raise InputError(f"host {host!r} resolves to a non-public address ({ip})")


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    check_remote(url, policy)
    opener = urllib.request.build_opener(_CheckedRedirects(policy))
    request = urllib.request.Request(url, headers={"User-Agent": "qwen2vl"})
    try:
        with opener.open(request, timeout=policy.timeout) as response:
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise InputError(f"HTTP {e.code} {e.reason} fetching {url}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, InputError):
            raise reason from None
        raise InputError(f"could not fetch {url}: {reason}") from None
    except (TimeoutError, socket.timeout):
        raise InputError(f"timed out after {policy.timeout} s fetching {url}") from None
    except OSError as e:
        raise InputError(f"could not fetch {url}: {e}") from None
    if len(data) > policy.max_bytes:
        raise InputError(f"{url} is larger than the limit of {policy.max_bytes} bytes")
    return data
