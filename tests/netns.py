"""A hoster_ha cluster whose hosts live in Linux network namespaces (ARCHITECTURE tier 5).

    net = Network(["c1", "c2", "c3", "w1", "w2"])    # namespaces, veths, bridge
    cluster = NetCluster(base_dir, net)               # node folders, configs, fakes
    cluster.start_all(); cluster.wait_armed()
    cluster.isolate("w1"); ...; cluster.heal()
    cluster.close()                                   # kills our processes, removes it all

The network.  A dedicated "switch" namespace holds a bridge (br0, no address); every
host is a namespace with one veth (eth0, 10.213.0.(11+i)/24) whose peer (p<i>) is a port
of that bridge.  Nothing is added to the root namespace: no link, no address, no route.
Names carry a per-run prefix (hhanet-<pid>-<n>-), so parallel or aborted runs never
collide, and cleanup_leftovers() removes what a dead run left behind.

The fault verbs (every one is logged to BASE/faults.log as "<unix time> <verb> <args>"):

    isolate(h)           h's bridge port down: every packet to or from h vanishes
    cut(a, b, mode)      only a<->b.  mode "timeout": a /32 route to the peer via
                         10.213.0.254, which nobody answers (connects time out);
                         "blackhole": a blackhole route (instant EINVAL)
    switch_down()        the bridge itself down: the whole network is gone
    heal()               every port and the bridge up, every cut route removed
    kill(h, power_off)   SIGKILL h's agent and watchdog; power_off (default): the host
                         loses power as well (its running VMs are gone, it is down until
                         restart(h)); without it the VMs keep running and nobody fences
                         (the case only kernel_watchdog covers)
    kill_one(h, which)   SIGKILL only the agent ("hoster_ha") or the watchdog
    hang(h, s, which)    SIGSTOP the agent (which="agent") or agent and watchdog
                         ("both") for s seconds, then SIGCONT
    restart(h)           power the host on again if it is down and start its agent

Each host runs its own agent (`ip netns exec NS python3 hoster_ha.py start --foreground`)
in production mode, with fake hoster/bhyvectl/shutdown/reboot (tools/fake_host_cmd.py;
zfs and sysctl are tiny sh scripts printing what it would print) and the marker
NODE/reboot_takes_host_down: a fence's reboot kills that host's agent and watchdog and
its VMs, as a real reboot would, and the host stays down until restart().  Nothing real
is ever destroyed or rebooted.  The harness never talks to the agents over the network:
it reads their files (pid files, the watchdog's ack, events.jsonl, logs, calls.log).
"""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AGENT = os.path.join(ROOT, "hoster_ha.py")
if os.path.join(ROOT, "tools") not in sys.path:   # also run by tools/soak.py
    sys.path.insert(0, os.path.join(ROOT, "tools"))
import fake_host
FAKE_COMMANDS = ("hoster", "bhyvectl", "shutdown", "reboot", "power", "pkill")
DATASET = "zroot/vm-encrypted"
# zfs and sysctl run on every inventory (every 10 s on every host, and on every GET vms):
# here they are tiny sh scripts printing what tools/fake_host_cmd.py would print, from
# files NetCluster.add_vm keeps current -- a Python process each would make bursts of
# CPU that starve pings on a 2-core machine.
FAKE_ZFS = """#!/bin/sh
# fake zfs (tests/netns.py): the `list` and `get mounted,keystatus` outputs of
# tools/fake_host_cmd.py, precomputed
node=$(dirname "$(dirname "$0")")
printf '%s zfs %s\\n' "$(date +%s.%N)" "$*" >> "$node/calls.log"
case " $* " in
*" list "*" snapshot "*) cat "$node/zfs-snapshots.txt" 2>/dev/null ;;
*" list "*) cat "$node/zfs-filesystems.txt" 2>/dev/null ;;
*" get "*" mounted,keystatus "*)
	# every dataset mounted with its key loaded (the netns faults are network and power ones)
	for ds in $(echo "$*" | sed 's/.* mounted,keystatus //'); do
		printf '%s\tmounted\tyes\n%s\tkeystatus\tavailable\n' "$ds" "$ds"
	done ;;
*) echo "fake zfs: unsupported arguments $*" >&2; exit 64 ;;
esac
"""
FAKE_SYSCTL = """#!/bin/sh
# fake sysctl (tests/netns.py): vm.stats.vm.v_free_count and hw.pagesize (1 GiB free)
printf '262144\\n4096\\n'
"""
PREFIX = "hhanet"
SUBNET = "10.213.0"
DEAD_GW = f"{SUBNET}.254"      # on the subnet, never answers ARP: "timeout" cuts
PORT = 7080
SECRET = "0123456789abcdef" * 2

# Short timings that keep the SPEC §2 rule:
# failover_time >= survival_window + watchdog_timeout + fence_timeout + 2*ping_interval + 5
#           15  >= 3.5 + 2.5 + 2.5 + 1 + 5 = 14.5
# A little wider than the loopback tests' (survival_window 2.5, vote_lease 1.5): three
# clusters run side by side on 2 cores, and a burst of fake commands (python processes)
# must not starve a ping into a false fence.  HOSTER_HA_NETNS_SCALE=1.5 (say) widens
# every timing on a busier machine; the rule holds for any scale >= 1.
SCALE = float(os.environ.get("HOSTER_HA_NETNS_SCALE", "1") or 1)
TIMINGS = {k: round(v * max(1.0, SCALE), 3) for k, v in {
    "ping_interval": 0.5, "ping_timeout": 0.45, "survival_window": 3.5, "vote_lease": 2.5,
    "watchdog_timeout": 2.5, "fence_timeout": 2.5, "failover_time": 15}.items()}

_seq = itertools.count(1)


# -- prerequisites and cleanup ------------------------------------------------------

def ip(*args, check=True, timeout=15):
    """Run `ip ARGS`; raises RuntimeError (with stderr) when check and it fails."""
    r = subprocess.run(["ip", *args], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def unavailable():
    """Why namespace tests cannot run here (a sentence), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespace tests need root (run as root, e.g. sudo make test)"
    if shutil.which("ip") is None:
        return "network namespace tests need the `ip` command (iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        r = ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"cannot create a network namespace: {r.stderr.strip()}"
        r = ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if r.returncode != 0:
            return f"cannot create a bridge in a namespace: {r.stderr.strip()}"
        r = ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1",
               check=False)
        if r.returncode != 0:
            return f"cannot create a veth pair: {r.stderr.strip()}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces():
    r = ip("netns", "list", check=False)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]


def ns_pids(ns):
    r = ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def remove_namespace(ns):
    """SIGKILL every process inside namespace ns (ours: we created it), then delete it.
    Deleting a namespace removes its veth ends, so their peers go too."""
    for _ in range(3):
        pids = ns_pids(ns)
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
    ip("netns", "del", ns, check=False)


def cleanup_leftovers(prefix=PREFIX):
    """Remove namespaces named PREFIX-<pid>-... whose creating process is gone."""
    removed = []
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    for ns in namespaces():
        m = pat.match(ns)
        if m and (int(m.group(1)) == os.getpid() and ns.endswith("-probe")
                  or not _pid_alive(int(m.group(1)))):
            remove_namespace(ns)
            removed.append(ns)
    return removed


# -- the network ----------------------------------------------------------------------

class Network:
    """A switch namespace with a bridge, and one namespace per host joined to it."""

    def __init__(self, hosts):
        if len(hosts) > 200:
            raise ValueError("at most 200 hosts")
        self.prefix = f"{PREFIX}-{os.getpid()}-{next(_seq)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = list(hosts)
        self.ns = {h: f"{self.prefix}-{h}" for h in hosts}
        self.address = {h: f"{SUBNET}.{11 + i}" for i, h in enumerate(hosts)}
        self.port = {h: f"p{i}" for i, h in enumerate(hosts)}
        self.cuts = {}          # frozenset({a, b}) -> mode
        self.isolated = set()
        self.closed = False
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self):
        sw = self.switch
        ip("netns", "add", sw)
        ip("-n", sw, "link", "set", "lo", "up")
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        for h in self.hosts:
            ns, port = self.ns[h], self.port[h]
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            ip("-n", sw, "link", "set", port, "master", "br0")
            ip("-n", sw, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.address[h]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def argv(self, host, argv):
        """argv run inside host's namespace."""
        return ["ip", "netns", "exec", self.ns[host], *argv]

    # faults
    def isolate(self, host):
        ip("-n", self.switch, "link", "set", self.port[host], "down")
        self.isolated.add(host)

    def rejoin(self, host):
        ip("-n", self.switch, "link", "set", self.port[host], "up")
        self.isolated.discard(host)

    def cut(self, a, b, mode="timeout"):
        if mode not in ("timeout", "blackhole"):
            raise ValueError(f"unknown cut mode {mode!r}")
        for x, y in ((a, b), (b, a)):
            if mode == "timeout":
                ip("-n", self.ns[x], "route", "replace", f"{self.address[y]}/32",
                   "via", DEAD_GW, "dev", "eth0")
            else:
                ip("-n", self.ns[x], "route", "replace", "blackhole", f"{self.address[y]}/32")
        self.cuts[frozenset((a, b))] = mode

    def uncut(self, a, b):
        for x, y in ((a, b), (b, a)):
            ip("-n", self.ns[x], "route", "del", f"{self.address[y]}/32", check=False)
            # a cut route can have been learned before: flush what the kernel remembers
            ip("-n", self.ns[x], "neigh", "flush", "to", self.address[y], check=False)
        self.cuts.pop(frozenset((a, b)), None)

    def switch_down(self):
        ip("-n", self.switch, "link", "set", "br0", "down")

    def switch_up(self):
        ip("-n", self.switch, "link", "set", "br0", "up")

    def heal(self):
        self.switch_up()
        for h in self.hosts:
            ip("-n", self.switch, "link", "set", self.port[h], "up")
        self.isolated.clear()
        for pair in list(self.cuts):
            self.uncut(*sorted(pair))

    def pids(self):
        out = []
        for ns in [self.switch, *self.ns.values()]:
            out += ns_pids(ns)
        return out

    def close(self):
        """Kill every process in our namespaces, delete them (links and bridge go along)."""
        if self.closed:
            return
        self.closed = True
        for ns in [*self.ns.values(), self.switch]:
            if ns in namespaces():
                remove_namespace(ns)

    def leftovers(self):
        """Our namespaces that still exist (empty after close())."""
        ours = set(self.ns.values()) | {self.switch}
        return [ns for ns in namespaces() if ns in ours]


# -- hosts and the cluster ------------------------------------------------------------

def _read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


class NetHost:
    """One host: its namespace, folder (config, fakes, run/state, VMs) and agent."""

    def __init__(self, cluster, name, candidate):
        self.cluster, self.name, self.candidate = cluster, name, candidate
        self.net = cluster.net
        self.address = self.net.address[name]
        self.dir = os.path.join(cluster.base, name)
        self.config = os.path.join(self.dir, "ha_config.json")
        self.run_dir = os.path.join(self.dir, "run")
        self.state_dir = os.path.join(self.dir, "state")
        self.log_file = os.path.join(self.dir, "hoster_ha.log")
        self.proc = None
        self.started_at = None     # wall time of the last start of the agent
        self.timers = []

    def path(self, *p):
        return os.path.join(self.dir, *p)

    def fake(self, *argv):
        """Run one of this host's fake commands (outside the namespace: it is files)."""
        return subprocess.run([self.path("bin", argv[0]), *argv[1:]], capture_output=True,
                              text=True, timeout=30)

    # processes
    def start(self):
        if self.is_down():
            self.fake("power", "on")
        out = open(self.path("agent.out"), "ab")
        try:
            self.proc = subprocess.Popen(
                self.net.argv(self.name, [sys.executable, AGENT, "start", "--foreground",
                                          "--config", self.config]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir)
        finally:
            out.close()
        self.started_at = time.time()
        return self.proc

    def pid(self, which="hoster_ha"):
        try:
            pid = int(_read(os.path.join(self.run_dir, f"{which}.pid")).strip() or 0)
        except ValueError:
            return None
        return pid or None

    def alive(self, which="hoster_ha"):
        """The agent (or watchdog) of this host runs (not a zombie)."""
        if which == "hoster_ha" and self.proc is not None:
            if self.proc.poll() is not None:
                return False
            pid = self.proc.pid
        else:
            pid = self.pid(which)
        if not pid:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    def signal(self, sig, which=("hoster_ha", "ha_watchdog")):
        for w in which:
            pid = self.pid(w) if not (w == "hoster_ha" and self.proc) else self.proc.pid
            if pid and (w != "hoster_ha" or self.alive()):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass

    def is_down(self):
        return os.path.exists(self.path("down"))

    def armed(self):
        """The running agent is armed: its watchdog acknowledged it (run/ha_watchdog.ack)
        and the agent logged `armed` (events.jsonl) in this incarnation.  The candidates
        learn it from its next ping: see NetCluster.wait_armed."""
        if not (self.alive() and self.proc is not None and
                _read(os.path.join(self.run_dir, "ha_watchdog.ack")).split()[:2]
                == ["armed", str(self.proc.pid)]):
            return False
        state = False
        for ev in self.events(since=(self.started_at or 0) - 0.5):
            if ev.get("event") == "armed":
                state = True
            elif ev.get("event") in ("self_fence", "quorum_lost", "watchdog_fence"):
                state = False
        return state

    # records
    def events(self, since=None):
        out = []
        for line in _read(os.path.join(self.state_dir, "events.jsonl")).splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and (since is None or ev.get("ts", 0) >= since):
                out.append(ev)
        return out

    def calls(self):
        return _read(self.path("calls.log"))

    def log(self):
        return _read(self.log_file)

    def live_vms(self):
        try:
            return sorted(os.listdir(self.path("vmm")))
        except FileNotFoundError:
            return []

    def vm_config(self, name):
        try:
            return json.loads(_read(self.path("vms", name, "vm_config.json"), "{}"))
        except ValueError:
            return {}

    def reboots(self):
        """Wall times of this host's fence reboots (fake shutdown/reboot calls)."""
        return [float(ln.split()[0]) for ln in self.calls().splitlines()
                if len(ln.split()) > 1 and ln.split()[1] in ("shutdown", "reboot")]


class NetCluster:
    """Hosts (3 candidates + workers) on a Network, each with its own folder and agent."""

    def __init__(self, base, net=None, candidates=("c1", "c2", "c3"), workers=("w1", "w2"),
                 timings=None):
        self.base = os.path.abspath(base)
        os.makedirs(self.base, exist_ok=True)
        names = list(candidates) + list(workers)
        self.own_net = net is None
        self.net = Network(names) if net is None else net
        self.timings = dict(TIMINGS if timings is None else timings)
        self.candidates = list(candidates)
        self.hosts = {n: NetHost(self, n, n in candidates) for n in names}
        self.faults_log = os.path.join(self.base, "faults.log")
        self.timers = []
        self.hung = {}
        for h in self.hosts.values():
            self._write(h)

    def __getitem__(self, name):
        return self.hosts[name]

    @property
    def names(self):
        return list(self.hosts)

    def _write(self, h):
        for d in ("bin", "vms", "vmm", "run", "state"):
            os.makedirs(h.path(d), exist_ok=True)
        fake_host.install(h.path("bin"), FAKE_COMMANDS)
        for c, text in (("zfs", FAKE_ZFS), ("sysctl", FAKE_SYSCTL)):
            with open(h.path("bin", c), "w") as f:
                f.write(text)
            os.chmod(h.path("bin", c), 0o755)
        self._write_zfs(h)
        open(h.path("reboot_takes_host_down"), "w").close()
        # Hoster's init marker: these hosts are initialised at every boot (no
        # NODE/hoster_init_path knob, so the fake's `power on` leaves it; test_realhost
        # covers a host that is not)
        open(h.path("hoster_init"), "w").close()
        b = h.path("bin")
        commands = {"zfs": [f"{b}/zfs"], "vm_start": [f"{b}/hoster", "vm", "start", "{vm}"],
                    "vm_cireset": [f"{b}/hoster", "vm", "cireset", "{vm}"],
                    "vm_destroy": [f"{b}/bhyvectl", "--destroy", "--vm={vm}"],
                    "reboot": [f"{b}/shutdown", "-r", "now"],
                    "reboot_now": [f"{b}/reboot", "-nq"],
                    "free_memory": [f"{b}/sysctl", "-n", "vm.stats.vm.v_free_count",
                                    "hw.pagesize"],
                    "hostname": ["echo", h.name],  # the kernel's name = the host's
                    # never the machine's pkill: it would match every host's supervisors
                    "vm_kill_supervisor": [f"{b}/pkill", "-9", "-f",
                                           "/vm_supervisor_service for {vm}$"]}
        cfg = {"hostname": h.name, "secret": SECRET,
               "candidates": [{"hostname": c, "protocol": "http",
                               "address": self.net.address[c], "port": PORT}
                              for c in self.candidates],
               "listen_address": h.address, "vm_datasets": [DATASET],
               "vmm_dir": h.path("vmm"), "commands": commands,
               "run_dir": h.run_dir, "state_dir": h.state_dir, "log_file": h.log_file,
               "hoster_config_dir": h.path(),  # Hoster's files (none): never the machine's
               "hoster_init_file": h.path("hoster_init")}  # `hoster init` ran (below)
        if not h.candidate:
            cfg.update(address=h.address, port=PORT)
        cfg.update(self.timings)
        with open(h.config, "w") as f:
            json.dump(cfg, f, indent=2)

    # -- VMs ---------------------------------------------------------------------

    def add_vm(self, host, name, parent, snapshot_age, production=True):
        """A copy of VM `name` on host (parent_host = parent) with one snapshot
        `snapshot_age` seconds old (None: no snapshot)."""
        h = self.hosts[host]
        d = h.path("vms", name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "vm_config.json"), "w") as f:
            json.dump({"parent_host": parent, "production": production, "memory": "1G"}, f)
        path = h.path("snapshots.json")
        snaps = json.loads(_read(path, "{}"))
        if snapshot_age is not None:
            created = int(time.time() - snapshot_age)
            snaps[name] = [[f"snap-{created}", created, str(zlib.crc32(name.encode()))]]
        with open(path, "w") as f:
            json.dump(snaps, f)
        self._write_zfs(h)

    @staticmethod
    def _write_zfs(h):
        """The fake zfs's answers for h (same format as tools/fake_host_cmd.py)."""
        try:
            names = sorted(os.listdir(h.path("vms")))
        except FileNotFoundError:
            names = []
        lines = [f"{DATASET}\t{h.path('vms')}"]
        lines += [f"{DATASET}/{n}\t{h.path('vms', n)}" for n in names]
        snaps = json.loads(_read(h.path("snapshots.json"), "{}"))
        rows = sorted((sn[1], f"{DATASET}/{n}@{sn[0]}\t{sn[1]}\t{sn[2]}")
                      for n in names for sn in snaps.get(n, []))
        for name, text in (("zfs-filesystems.txt", lines),
                           ("zfs-snapshots.txt", [r for _, r in rows])):
            with open(h.path(name + ".tmp"), "w") as f:
                f.write("".join(ln + "\n" for ln in text))
            os.replace(h.path(name + ".tmp"), h.path(name))

    def spread_vms(self, per_host=2, owners=None):
        """Production VMs vm-<host><a|b> running on their parent (newest snapshot, 10 min),
        each with 2 older replicas (1 h, 2 h) on other hosts, spread round the ring."""
        names = self.names
        n = len(names)
        vms = {}
        for i, owner in enumerate(names):
            if owners is not None and owner not in owners:
                continue
            for k in range(per_host):
                vm = f"vm-{owner}{'ab'[k]}"
                self.add_vm(owner, vm, owner, 600)
                for j, age in ((1 + 2 * k, 3600), (2 + 2 * k, 7200)):
                    self.add_vm(names[(i + j) % n], vm, owner, age)
                vms[vm] = owner
        for vm, owner in vms.items():
            r = self.hosts[owner].fake("hoster", "vm", "start", vm)
            assert r.returncode == 0, r.stderr
        self.vms = vms
        return vms

    def where(self):
        """{vm: [hosts where it is live now]} for every VM that has a copy somewhere."""
        out = {}
        for name, h in self.hosts.items():
            try:
                copies = os.listdir(h.path("vms"))
            except FileNotFoundError:
                copies = []
            for vm in copies:
                out.setdefault(vm, [])
            for vm in h.live_vms():
                out.setdefault(vm, []).append(name)
        return out

    # -- processes ---------------------------------------------------------------

    def start_all(self, names=None, stagger=0.3):
        """Start agents in order.  Each candidate is started only once the one before it
        runs (its startup_time is taken before it writes its pid file), so the first
        candidate has the earliest startup_time and becomes the manager (SPEC §3.2)."""
        for n in names or self.names:
            h = self.hosts[n]
            h.start()
            if h.candidate:
                self.wait_for(lambda: h.pid() == h.proc.pid or h.proc.poll() is not None, 20,
                              interval=0.05)
            time.sleep(stagger)

    def wait_for(self, cond, timeout, interval=0.1):
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v or time.monotonic() >= deadline:
                return v
            time.sleep(interval)

    def wait_armed(self, names=None, timeout=30):
        """Wait until every host in names is armed, then long enough for its pings to
        have told the candidates so (a node the candidates hold unarmed is never
        failed over: SPEC §3.4)."""
        names = names or self.names
        ok = self.wait_for(lambda: all(self.hosts[n].armed() for n in names), timeout)
        if not ok:
            raise AssertionError("not armed within %ss: %s" % (
                timeout, [n for n in names if not self.hosts[n].armed()]))
        time.sleep(2 * self.timings["ping_interval"] + self.timings["ping_timeout"])
        return ok

    def manager(self):
        """(hostname, term) of the manager, from the candidates' events.jsonl: the running
        candidate whose latest manager event (this incarnation) is `manager_elected`."""
        best = (None, 0)
        for c in self.candidates:
            h = self.hosts[c]
            if not h.alive():
                continue
            state = None
            for ev in h.events(since=(h.started_at or 0) - 0.5):
                if ev.get("event") == "manager_elected":
                    state = ev.get("term", 0)
                elif ev.get("event") == "manager_lost":
                    state = None
            if state is not None and state >= best[1]:
                best = (c, state)
        return best

    def wait_manager(self, timeout=20, other_than=None):
        def cond():
            m, _ = self.manager()
            return m if m and m != other_than else None
        return self.wait_for(cond, timeout)

    # -- faults (each is logged to faults.log) --------------------------------------

    def fault(self, verb, *args):
        with open(self.faults_log, "a") as f:
            f.write(f"{time.time():.6f} {verb} {' '.join(str(a) for a in args)}\n".rstrip()
                    + "\n")

    def isolate(self, host):
        self.fault("isolate", host)
        self.net.isolate(host)

    def rejoin(self, host):
        self.fault("rejoin", host)
        self.net.rejoin(host)

    def cut(self, a, b, mode="timeout"):
        self.fault("cut", a, b, mode)
        self.net.cut(a, b, mode)

    def uncut(self, a, b):
        self.fault("uncut", a, b)
        self.net.uncut(a, b)

    def switch_down(self):
        self.fault("switch_down")
        self.net.switch_down()

    def switch_up(self):
        self.fault("switch_up")
        self.net.switch_up()

    def heal(self):
        self.fault("heal")
        self.net.heal()

    def kill(self, host, power_off=True):
        """SIGKILL the agent and the watchdog; power_off: the host dies with them."""
        h = self.hosts[host]
        self.fault("kill", host, "power_off" if power_off else "processes_only")
        if power_off:
            h.fake("power", "off", "killed")   # kills both, VMs gone, host down
        h.signal(signal.SIGKILL)
        if h.proc is not None:
            try:
                h.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def kill_one(self, host, which):
        """SIGKILL only the agent (which="hoster_ha") or only the watchdog."""
        self.fault("kill_one", host, which)
        self.hosts[host].signal(signal.SIGKILL, (which,))

    def hang(self, host, seconds, which="agent"):
        """SIGSTOP the agent (or agent and watchdog: which="both"), SIGCONT after seconds."""
        h = self.hosts[host]
        procs = ("hoster_ha",) if which == "agent" else ("hoster_ha", "ha_watchdog")
        pids = [h.proc.pid if p == "hoster_ha" and h.proc else h.pid(p) for p in procs]
        pids = [p for p in pids if p]
        self.fault("hang", host, which, f"{seconds:g}s")
        for p in pids:
            try:
                os.kill(p, signal.SIGSTOP)
            except OSError:
                pass
        self.hung[host] = pids

        def resume():
            self.fault("resume", host)
            for p in pids:
                try:
                    os.kill(p, signal.SIGCONT)
                except OSError:
                    pass
            self.hung.pop(host, None)
        t = threading.Timer(seconds, resume)
        t.daemon = True
        t.start()
        self.timers.append(t)
        return t

    def restart(self, host):
        """Power the host on (if it is down) and start its agent again."""
        h = self.hosts[host]
        self.fault("restart", host)
        if h.alive():
            raise RuntimeError(f"{host}: the agent still runs")
        h.start()

    # -- records -----------------------------------------------------------------

    def host_dirs(self):
        return {n: h.dir for n, h in self.hosts.items()}

    def records(self):
        import invariants
        return invariants.load(self.host_dirs(), self.faults_log)

    def close(self, keep=False):
        """Stop everything: resume hung processes, kill every process in our namespaces,
        delete the namespaces (and with them the veths and the bridge)."""
        for t in self.timers:
            t.cancel()
        for pids in self.hung.values():
            for p in pids:
                try:
                    os.kill(p, signal.SIGCONT)
                except OSError:
                    pass
        for h in self.hosts.values():
            h.signal(signal.SIGKILL)
        for h in self.hosts.values():
            if h.proc is not None:
                try:
                    h.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if self.own_net:
            self.net.close()
        else:
            for pid in self.net.pids():   # the network stays for the next cluster
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.net.heal()
        if not keep:
            shutil.rmtree(self.base, ignore_errors=True)
