"""Which configured host runs a domain: asked of each host's libvirt in turn."""
from __future__ import annotations

from virtwarden.hypervisor.types import DomainInfo

from virtwarden.config import Config
from virtwarden.errors import DomainNotFound, HypervisorUnavailable


def find_host(cfg: Config, domain: str, host: str | None = None) -> tuple[str, DomainInfo]:
    """The configured host that has ``domain`` (asking libvirt), or ``host`` when given.
    The domain's information comes without its disks' sizes (0): callers want its host
    and XML, and a size is a query of QEMU's block nodes, not to be made needlessly."""
    from virtwarden.hypervisor import connect

    candidates = [host] if host else list(cfg.hosts)
    unreachable = []
    for name in candidates:
        try:
            with connect(name, cfg.host(name).uri) as hv:
                return name, hv.domain(domain, sizes=False)
        except DomainNotFound:
            continue
        except HypervisorUnavailable as e:
            unreachable.append(str(e))
    where = f"host {host}" if host else f"any configured host ({', '.join(candidates)})"
    detail = f"; unreachable: {'; '.join(unreachable)}" if unreachable else ""
    raise DomainNotFound(f"no domain {domain!r} on {where}{detail}")
