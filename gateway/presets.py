"""Named host lists a policy can include by name, and the `registry` profile's list.

A preset is a set of hostname patterns plus the ports they are reachable on
(`None` = any port). Operators add their own in the config file (`[presets.NAME]`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Annotated

from gateway.errors import GatewayError
from gateway.hostnames import normalize_pattern
from gateway.policy import HOSTNAME_SCHEMA, PORT_SCHEMA
from gateway.schema import Note


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    hosts: tuple[str, ...]
    ports: frozenset[int] | None
    description: str = ""

    def to_dict(self) -> dict[str, object]:
        ports = sorted(self.ports) if self.ports is not None else None
        return asdict(PresetView(self.name, self.description, list(self.hosts), ports))


@dataclass(frozen=True, slots=True)
class PresetView:
    """A named host list a policy can include (egress.presets)."""

    name: str
    description: str
    hosts: list[Annotated[str, Note(HOSTNAME_SCHEMA)]]
    ports: Annotated[list[Annotated[int, Note(PORT_SCHEMA)]] | None, Note(description="null: any port.")]


def make_preset(name: str, hosts: Iterable[str], ports: Iterable[int] | None, description: str = "") -> Preset:
    normalized: list[str] = []
    for index, host in enumerate(hosts):
        try:
            normalized.append(normalize_pattern(host))
        except GatewayError as exc:
            raise exc.at(f"presets.{name}.hosts[{index}]") from None
    if ports is not None and (isinstance(ports, str | bytes) or not isinstance(ports, Iterable)):
        raise GatewayError(
            "INVALID_PORT", f"expected a list of ports, got {type(ports).__name__}", f"presets.{name}.ports"
        )
    port_list = None if ports is None else tuple(ports)
    if port_list is not None:  # check before hashing: a list entry would raise TypeError in frozenset()
        for port in port_list:
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise GatewayError("INVALID_PORT", f"{port!r} is not a port in 1-65535", f"presets.{name}.ports")
    port_set = None if port_list is None else frozenset(port_list)
    return Preset(name, tuple(dict.fromkeys(normalized)), port_set, description)


PACKAGE_REGISTRIES = make_preset(
    "package-registries",
    [
        # Python
        "pypi.org",
        "files.pythonhosted.org",
        "pypi.python.org",
        # JavaScript
        "registry.npmjs.org",
        "registry.yarnpkg.com",
        "registry.npmjs.com",
        # Rust
        "crates.io",
        "index.crates.io",
        "static.crates.io",
        "static.rust-lang.org",
        # Java
        "repo.maven.apache.org",
        "repo1.maven.org",
        "central.sonatype.com",
        "plugins.gradle.org",
        "services.gradle.org",
        # Ruby
        "rubygems.org",
        "index.rubygems.org",
        # Go
        "proxy.golang.org",
        "sum.golang.org",
        # .NET, PHP, conda
        "api.nuget.org",
        "repo.packagist.org",
        "conda.anaconda.org",
        "repo.anaconda.com",
        # Hugging Face Hub
        "huggingface.co",
        "cdn-lfs.huggingface.co",
        "cdn-lfs-us-1.huggingface.co",
        "cas-bridge.xethub.hf.co",
        # OS package mirrors
        "deb.debian.org",
        "security.debian.org",
        "archive.ubuntu.com",
        "security.ubuntu.com",
        "ports.ubuntu.com",
        "dl-cdn.alpinelinux.org",
        "mirrors.fedoraproject.org",
    ],
    # Debian and Ubuntu mirrors are still commonly fetched over plain HTTP (signed by apt).
    [80, 443],
    "Package registries and OS package mirrors (the registry profile).",
)

GIT_HOSTS = make_preset(
    "git-hosts",
    [
        "github.com",
        "api.github.com",
        "codeload.github.com",
        "objects.githubusercontent.com",
        "raw.githubusercontent.com",
        "ssh.github.com",
        "gitlab.com",
        "registry.gitlab.com",
        "bitbucket.org",
        "api.bitbucket.org",
    ],
    [22, 443],
    "Git hosting over SSH (22) and HTTPS (443).",
)

AI_APIS = make_preset(
    "ai-apis",
    [
        "api.openai.com",
        "api.anthropic.com",
        "generativelanguage.googleapis.com",
        "aiplatform.googleapis.com",
        "api.mistral.ai",
        "api.cohere.com",
        "api.groq.com",
        "api.together.xyz",
        "openrouter.ai",
    ],
    [443],
    "Hosted AI model APIs over HTTPS.",
)

BUILTIN_PRESETS: Mapping[str, Preset] = {p.name: p for p in (PACKAGE_REGISTRIES, GIT_HOSTS, AI_APIS)}

#: The preset that is the `registry` profile's whole allowlist.
REGISTRY_PRESET = PACKAGE_REGISTRIES.name
