"""Which upstream a request reaches, and the repository as both sides name it, decided once by the
front's Upstreams.choose: no sockets (the clients are built, never started). test_routing.py keeps
the same rules covered end to end with real clients and registries."""

from __future__ import annotations

import pytest

from edgecache import errors
from edgecache.config import UpstreamConfig
from edgecache.http.front import CHOSEN_KEPT, Upstreams
from edgecache.metrics import Metrics
from edgecache.upstream.client import UpstreamClient

HUB = UpstreamConfig(name="docker.io", url="https://registry-1.docker.io")
GHCR = UpstreamConfig(name="ghcr.io", url="https://ghcr.io", aliases=("ghcr.mirror.corp",))
CORP = UpstreamConfig(name="registry.corp:5000", url="https://registry.corp:5000")


def upstreams(default: str = "docker.io", *configs: UpstreamConfig) -> Upstreams:
    chosen = configs or (HUB, GHCR, CORP)
    metrics = Metrics(c.name for c in chosen)
    return Upstreams({c.name: UpstreamClient(c, metrics) for c in chosen}, default)


def choose(name: str, ns: str | None = None, host: str = "edge.dc1:5000") -> tuple[str, str, str]:
    target = upstreams().choose(name, ns, host)
    return target.upstream_name, str(target.requested), str(target.repo)


def test_dockerd_reaches_the_default_upstream_and_official_images_get_library() -> None:
    assert choose("alpine") == ("docker.io", "alpine", "library/alpine")
    assert choose("bitnami/redis") == ("docker.io", "bitnami/redis", "bitnami/redis")


def test_containerd_ns_chooses_the_upstream_and_a_repeated_prefix_is_dropped() -> None:
    assert choose("owner/app", ns="ghcr.io") == ("ghcr.io", "owner/app", "owner/app")
    assert choose("ghcr.io/owner/app", ns="ghcr.io") == ("ghcr.io", "owner/app", "owner/app")
    assert choose("alpine", ns="docker.io") == ("docker.io", "alpine", "library/alpine")


def test_a_registry_prefix_in_the_path_chooses_the_upstream() -> None:
    assert choose("ghcr.io/owner/app") == ("ghcr.io", "owner/app", "owner/app")
    assert choose("registry.corp:5000/team/app") == ("registry.corp:5000", "team/app", "team/app")
    assert choose("docker.io/alpine") == ("docker.io", "alpine", "library/alpine")


def test_an_alias_in_the_host_header_chooses_the_upstream() -> None:
    assert choose("owner/app", host="ghcr.mirror.corp") == ("ghcr.io", "owner/app", "owner/app")
    assert choose("owner/app", host="GHCR.mirror.corp:443") == ("ghcr.io", "owner/app", "owner/app")


@pytest.mark.parametrize(
    ("name", "ns"),
    [
        ("owner/app", "quay.io"),  # containerd names a registry this mirror does not have
        ("quay.io/owner/app", None),  # a dotted first component with Docker Hub as the default
        ("localhost/app", None),
        ("other.corp:5000/app", None),  # a port makes it a registry whatever the default
    ],
)
def test_an_unconfigured_registry_is_refused_never_contacted(name: str, ns: str | None) -> None:
    with pytest.raises(errors.UpstreamUnknown) as refused:
        upstreams().choose(name, ns, "edge.dc1:5000")
    assert refused.value.status == 404 and refused.value.code == "NAME_UNKNOWN"


def test_a_dot_is_a_namespace_when_the_default_upstream_is_not_docker_hub() -> None:
    """Other registries' namespaces may contain dots; only Docker Hub's never do."""
    target = upstreams("registry.corp:5000", CORP).choose("team.one/app", None, "edge")
    assert (target.upstream_name, str(target.repo)) == ("registry.corp:5000", "team.one/app")


def test_an_invalid_repository_name_is_refused_after_the_upstream_is_chosen() -> None:
    with pytest.raises(errors.NameInvalid):
        upstreams().choose("ghcr.io/Owner/App", None, "edge")


def test_remembered_choices_answer_alike_and_stay_bounded() -> None:
    """Choices are remembered (the hot path of every request): a remembered one answers exactly as
    the first did, a refusal is refused again every time, and hostile variety cannot grow the memory
    past its bound."""
    chosen = upstreams()
    first = chosen.choose("alpine", None, "edge")
    assert chosen.choose("alpine", None, "edge") is first
    for _ in range(2):
        with pytest.raises(errors.UpstreamUnknown):
            chosen.choose("quay.io/owner/app", None, "edge")
    for n in range(CHOSEN_KEPT + 10):
        chosen.choose(f"team/app{n}", None, "edge")
    assert len(chosen._chosen) <= CHOSEN_KEPT
    again = chosen.choose("alpine", None, "edge")
    assert (again.upstream_name, str(again.repo)) == ("docker.io", "library/alpine")
