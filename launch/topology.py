"""Which network fabrics a job's hosts share: NICs read from sysfs, or a YAML cluster description.

A host's NICs come from ``/sys/class/infiniband/<dev>/ports/<n>/{state,rate,link_layer}`` (InfiniBand, or
RoCE when the link layer is Ethernet) and ``/sys/class/net/<if>/{speed,operstate,type}`` (physical
Ethernet; virtual interfaces and the netdevs of RDMA ports are not counted twice). sysfs says what a host
*has*, not which hosts can reach each other over it: two InfiniBand pods look alike from inside. So the
cluster description names that (``loomtrain plan --cluster FILE``, ``train --cluster FILE``):

.. code-block:: yaml

    fabrics:                      # name: kind (ib | roce | ethernet) and Gbit/s per device, each direction
      pod-a: {kind: ib, gbps: 400}
      pod-b: {kind: ib, gbps: 400}
      dc: {kind: ethernet, gbps: 25}
    between: dc                   # what joins hosts of different fabrics (default: the slowest fabric)
    intra_host_gbps: 3600         # device to device inside a host (NVLink)
    hosts:                        # in node-rank order: host i holds the next `devices` ranks
      - {name: a1, fabric: pod-a, devices: 8, interface: ib0, between_interface: eth0}  # where sockets bind
      - {name: b1, fabric: pod-b, devices: 8}

Hosts are matched to ranks by ``LOOMTRAIN_HOST_ID`` or the hostname (``faulttol.manager.host_key``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from loomtrain.errors import ConfigError

KINDS = ("ib", "roce", "ethernet")
_RANK = {"ib": 0, "roce": 1, "ethernet": 2}  # fastest class first, at equal rates
ARPHRD_ETHER, ARPHRD_INFINIBAND, ARPHRD_LOOPBACK = 1, 32, 772


@dataclass(frozen=True)
class Nic:
    name: str  # "mlx5_0/1" (RDMA device / port) or "eth0"
    kind: str  # ib | roce | ethernet
    gbps: float
    up: bool
    netdev: str | None  # the interface sockets bind to (an RDMA port's IPoIB or RoCE netdev, or the NIC itself)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def discover_nics(sysfs: str = "/sys") -> list[Nic]:
    """Every RDMA port and physical Ethernet NIC of this host, fastest first (active ones before down ones)."""
    nics, claimed = [], set()
    ib_root = os.path.join(sysfs, "class", "infiniband")
    for dev in sorted(os.listdir(ib_root)) if os.path.isdir(ib_root) else []:
        netdevs = sorted(os.listdir(os.path.join(ib_root, dev, "device", "net"))) \
            if os.path.isdir(os.path.join(ib_root, dev, "device", "net")) else []
        claimed.update(netdevs)
        ports = os.path.join(ib_root, dev, "ports")
        for port in sorted(os.listdir(ports)) if os.path.isdir(ports) else []:
            base = os.path.join(ports, port)
            netdev = _port_netdev(sysfs, base, port, netdevs)
            rate = _read(os.path.join(base, "rate")) or "0"  # "200 Gb/sec (4X HDR)"
            state = _read(os.path.join(base, "state")) or ""  # "4: ACTIVE"
            layer = _read(os.path.join(base, "link_layer")) or "InfiniBand"
            try:
                gbps = float(rate.split()[0])
            except ValueError:
                gbps = 0.0
            nics.append(Nic(f"{dev}/{port}", "ib" if layer == "InfiniBand" else "roce", gbps,
                            state.split(":")[-1].strip() in ("ACTIVE", "ACTIVE_DEFER"), netdev))
    net_root = os.path.join(sysfs, "class", "net")
    for name in sorted(os.listdir(net_root)) if os.path.isdir(net_root) else []:
        base = os.path.join(net_root, name)
        if name in claimed or not os.path.exists(os.path.join(base, "device")):  # virtual, or an RDMA netdev
            continue
        if (_read(os.path.join(base, "type")) or "") != str(ARPHRD_ETHER):
            continue
        speed = _read(os.path.join(base, "speed"))  # Mb/s; -1 or unreadable when down or unknown
        try:
            mbps = float(speed) if speed is not None else -1.0
        except ValueError:
            mbps = -1.0
        up = _read(os.path.join(base, "operstate")) == "up"  # speed -1 while up: a virtio NIC, a VF
        nics.append(Nic(name, "ethernet", max(0.0, mbps / 1000), up, name))
    return sorted(nics, key=lambda n: (not n.up, -n.gbps, _RANK[n.kind], n.name))


def _port_netdev(sysfs: str, port_dir: str, port: str, netdevs: list[str]) -> str | None:
    """The netdev of one RDMA port: RoCE names it in its GID table; IPoIB's has ``dev_port`` = port - 1."""
    ndev = _read(os.path.join(port_dir, "gid_attrs", "ndevs", "0"))
    if ndev:
        return ndev
    for name in netdevs:
        dev_port = _read(os.path.join(sysfs, "class", "net", name, "dev_port"))
        if dev_port is not None and int(dev_port, 0) == int(port) - 1:
            return name
    return netdevs[0] if len(netdevs) == 1 else None


def best_nic(nics: list[Nic]) -> Nic | None:
    """The NIC heavy traffic should use: the fastest active one."""
    active = [n for n in nics if n.up]
    return active[0] if active else None


@dataclass(frozen=True)
class Fabric:
    name: str
    kind: str
    gbps: float


@dataclass(frozen=True)
class Host:
    name: str
    fabric: str
    devices: int
    interface: str | None = None  # where sockets of its fabric's groups bind
    between_interface: str | None = None  # where sockets of groups between fabrics bind


@dataclass
class Cluster:
    """Hosts in node-rank order, the fabric each one sits on, and what joins fabrics."""

    fabrics: dict[str, Fabric]
    hosts: list[Host]
    between: str
    intra_host_gbps: float = 3600.0
    first_rank: list[int] = field(init=False)

    def __post_init__(self):
        self.first_rank, r = [], 0
        for h in self.hosts:
            self.first_rank.append(r)
            r += h.devices

    @property
    def world_size(self) -> int:
        return sum(h.devices for h in self.hosts)

    def host_of(self, rank: int) -> int:
        for i in range(len(self.hosts) - 1, -1, -1):
            if rank >= self.first_rank[i]:
                return i
        raise ValueError(rank)

    def link(self, ranks) -> tuple[str, float]:
        """(what a group of ranks talks over, Gbit/s per device): inside a host, one fabric, or the link
        between fabrics."""
        hosts = {self.host_of(r) for r in ranks}
        if len(hosts) == 1:
            return "host", self.intra_host_gbps
        fabrics = {self.hosts[h].fabric for h in hosts}
        if len(fabrics) == 1:
            f = self.fabrics[fabrics.pop()]
            return f.name, f.gbps
        b = self.fabrics[self.between]
        return b.name, b.gbps


def _field(where: str, value, typ, positive: bool = False):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or isinstance(value, bool) or (positive and value <= 0):
        want = {str: "a string", int: "an integer", float: "a number"}[typ] + (" > 0" if positive else "")
        raise ConfigError(f"{where}: must be {want}, got {value!r}")
    return value


def load_cluster(path: str) -> Cluster:
    """Read and check a cluster description (module docstring); one line naming the field when it is wrong."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"--cluster: cannot read '{path}' ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--cluster: '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    return cluster_from_dict(raw, path)


def cluster_from_dict(raw: dict, where: str = "cluster") -> Cluster:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with fabrics and hosts")
    unknown = set(raw) - {"fabrics", "hosts", "between", "intra_host_gbps"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (valid: fabrics, hosts, between, "
                          "intra_host_gbps)")
    fabrics = {}
    for name, f in (raw.get("fabrics") or {}).items():
        if not isinstance(f, dict):
            raise ConfigError(f"{where}: fabrics.{name}: expected {{kind, gbps}}")
        kind = f.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: fabrics.{name}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        fabrics[str(name)] = Fabric(str(name), kind, _field(f"{where}: fabrics.{name}.gbps", f.get("gbps"), float,
                                                            positive=True))
    if not fabrics:
        raise ConfigError(f"{where}: fabrics: needs at least one fabric")
    hosts = []
    for i, h in enumerate(raw.get("hosts") or []):
        if not isinstance(h, dict):
            raise ConfigError(f"{where}: hosts[{i}]: expected {{name, fabric, devices}}")
        name = _field(f"{where}: hosts[{i}].name", h.get("name"), str)
        fabric = h.get("fabric")
        if fabric not in fabrics:
            raise ConfigError(f"{where}: hosts[{i}].fabric: must be one of {', '.join(fabrics)}, got {fabric!r}")
        devices = _field(f"{where}: hosts[{i}].devices", h.get("devices", 1), int, positive=True)
        ifaces = [None if h.get(k) is None else _field(f"{where}: hosts[{i}].{k}", h[k], str)
                  for k in ("interface", "between_interface")]
        unknown = set(h) - {"name", "fabric", "devices", "interface", "between_interface"}
        if unknown:
            raise ConfigError(f"{where}: hosts[{i}]: unknown key {sorted(unknown)[0]!r} (valid: name, fabric, devices, "
                              "interface, between_interface)")
        hosts.append(Host(name, fabric, devices, *ifaces))
    if not hosts:
        raise ConfigError(f"{where}: hosts: needs at least one host")
    if len({h.name for h in hosts}) != len(hosts):
        raise ConfigError(f"{where}: hosts: names must be unique")
    between = raw.get("between", min(fabrics.values(), key=lambda f: f.gbps).name)
    if between not in fabrics:
        raise ConfigError(f"{where}: between: must be one of {', '.join(fabrics)}, got {between!r}")
    intra = _field(f"{where}: intra_host_gbps", raw.get("intra_host_gbps", 3600.0), float, positive=True)
    return Cluster(fabrics, hosts, between, intra)


def cluster_from_nics(hosts: list[tuple[str, int, list[Nic]]]) -> Cluster:
    """A cluster when no description is given: each host on the fabric its best NIC names (kind and rate);
    hosts whose best NICs match are assumed to share that fabric, and the slowest Ethernet fabric among
    them (else the slowest fabric) is assumed to join the rest. Describe the cluster when that is wrong."""
    fabrics, placed = {}, []
    for name, devices, nics in hosts:
        nic = best_nic(nics)
        kind, gbps = (nic.kind, nic.gbps) if nic else ("ethernet", 1.0)
        key = f"{kind}-{gbps:g}g"
        fabrics[key] = Fabric(key, kind, gbps)
        placed.append(Host(name, key, devices, nic.netdev if nic else None))
    eth = [f for f in fabrics.values() if f.kind == "ethernet"]
    between = min(eth or fabrics.values(), key=lambda f: f.gbps).name
    return Cluster(fabrics, placed, between)
