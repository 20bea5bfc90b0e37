"""A hoster_ha cluster on loopback, for the demo and the process tests.

Each node is a folder with its config, run/state dirs, a log file and fake host
commands (tools/fake_host_cmd.py) named in `commands`, so no real zfs, bhyvectl,
hoster, shutdown or reboot is ever run.  Candidates listen on 127.0.0.1-127.0.0.3,
workers on 127.0.0.4 and up, all on one port.

Each node's fake host starts as a happy, initialised Hoster host (the default of
tools/fake_host_cmd.py, with Hoster's init check on and its marker NODE/hoster_init
present).  Node has helpers for the fake's knobs (its docstring lists them all):
set_hostname, set_initialised, set_start / clear_start, lock_dataset / unlock_dataset,
power_off / power_on, and fake / zfs / hoster to run a fake command as a test step.
"""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "hoster_ha.py")
FAKE_COMMANDS = ("zfs", "hoster", "bhyvectl", "shutdown", "reboot", "sysctl", "hostname",
                 "power", "vm_supervisor_service", "pkill")
_spec = importlib.util.spec_from_file_location(
    "fake_host", os.path.join(ROOT, "tools", "fake_host.py"))
fake_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_host)
DATASET = fake_host.DEFAULT_DATASET

# Short timings that keep the SPEC §2 rule:
# failover_time >= survival_window + watchdog_timeout + fence_timeout + 2*ping_interval + 5
FAST = {"ping_interval": 0.5, "ping_timeout": 0.4, "survival_window": 2.5, "vote_lease": 1.5,
        "watchdog_timeout": 2, "fence_timeout": 2, "failover_time": 13}


def free_port(addresses):
    """A TCP port free on every address (checked by binding)."""
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ok = True
        for a in addresses:
            t = socket.socket()
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                t.bind((a, port))
            except OSError:
                ok = False
            finally:
                t.close()
        if ok:
            return port
    raise RuntimeError("no free port")


def our_pids(base):
    """PIDs of live (non-zombie) processes whose command line names a path under base
    (Linux /proc; [] elsewhere): the leak check of the process tests."""
    needle = os.fsencode(str(base))
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for d in entries:
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if needle in f.read():  # a zombie has an empty cmdline
                    pids.append(int(d))
        except OSError:
            continue
    return pids


class Node:
    def __init__(self, cluster, name, address, candidate):
        self.cluster, self.name, self.address, self.candidate = cluster, name, address, candidate
        self.dir = os.path.join(cluster.base, name)
        self.config = os.path.join(self.dir, "ha_config.json")
        self.log_file = os.path.join(self.dir, "hoster_ha.log")
        self.run_dir = os.path.join(self.dir, "run")
        self.state_dir = os.path.join(self.dir, "state")
        self.init_marker = os.path.join(self.dir, "hoster_init")   # /var/run/hoster_init
        self.host = fake_host.FakeHost(self.dir)
        self.proc = None

    def cli(self, *args, timeout=30):
        """Run `hoster_ha.py ARGS --config ...`; returns CompletedProcess (text)."""
        return subprocess.run([sys.executable, AGENT, *args, "--config", self.config],
                              capture_output=True, text=True, timeout=timeout)

    def status(self):
        r = self.cli("status", "--json", timeout=10)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {}

    def start(self, foreground=True):
        """Start the agent.  Foreground: a child process we can wait() on."""
        args = [sys.executable, AGENT, "start", "--config", self.config, "--foreground"]
        if self.cluster.debug:
            args.append("--ha-debug")
        if foreground:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            return self.proc
        args.remove("--foreground")
        return subprocess.run(args, capture_output=True, text=True, timeout=30)

    def pid(self, which="hoster_ha"):
        try:
            with open(os.path.join(self.run_dir, f"{which}.pid")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def signal(self, sig, which="hoster_ha"):
        pid = self.pid(which)
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def log(self):
        try:
            with open(self.log_file, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def calls(self):
        try:
            with open(os.path.join(self.dir, "calls.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def starts(self, vm):
        """Times of the completed `hoster vm start VM` calls here ("pending ..." and
        "refused ..." lines are not starts: the fake writes those with a prefix)."""
        out = []
        for line in self.calls().splitlines():
            ts, _, rest = line.partition(" ")
            if rest == f"hoster vm start {vm}":
                out.append(float(ts))
        return out

    # -- the fake host's knobs (tools/fake_host_cmd.py) ---------------------------------

    def fake(self, cmd, *args, timeout=30):
        """Run the fake host command `cmd` (a test step: `zfs load-key`, `hoster init`,
        `hoster vm start-all`, `power on`...); CompletedProcess (text)."""
        return subprocess.run([os.path.join(self.dir, "bin", cmd), *args], check=False,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def zfs(self, *args):
        return self.fake("zfs", *args)

    def hoster(self, *args):
        return self.fake("hoster", *args)

    def set_hostname(self, name):
        """The host's kern.hostname (what Hoster compares parent_host with); None: back to
        the default, the agent's configured hostname."""
        path = os.path.join(self.dir, "hostname")
        if name is None:
            if os.path.exists(path):
                os.unlink(path)
            return
        with open(path, "w") as f:
            f.write(name + "\n")

    def set_initialised(self, initialised):
        """Create (`hoster init`) or remove (a reboot) Hoster's init marker."""
        if initialised:
            r = self.hoster("init")
            assert r.returncode == 0, r
        elif os.path.exists(self.init_marker):
            os.unlink(self.init_marker)

    def set_start(self, vm="*", appear_after=None, dies_after=None, times=None):
        """How the next `hoster vm start` of vm (or of every VM: "*") behaves: it returns
        at once and the VM appears appear_after s later; it vanishes dies_after s after it
        appeared; for the next `times` starts only (None: until clear_start)."""
        path = os.path.join(self.dir, "vm_start.json")
        knobs = {}
        if os.path.exists(path):
            with open(path) as f:
                knobs = json.load(f)
        entry = {k: v for k, v in (("appear_after", appear_after), ("dies_after", dies_after),
                                   ("times", times)) if v is not None}
        knobs[vm] = entry
        with open(path + ".tmp", "w") as f:
            json.dump(knobs, f)
        os.replace(path + ".tmp", path)

    def clear_start(self):
        path = os.path.join(self.dir, "vm_start.json")
        if os.path.exists(path):
            os.unlink(path)

    def lock_dataset(self, dataset=DATASET):
        """The dataset as after a reboot without `zfs mount -a -l`: unmounted, key unloaded
        (its VMs' vm_config.json files are gone from disk)."""
        for args in (("unmount", dataset), ("unload-key", dataset)):
            r = self.zfs(*args)
            assert r.returncode == 0, r

    def unlock_dataset(self, dataset=DATASET):
        """What the operator runs after a reboot: `zfs mount -a -l` (dataset: unused, every
        dataset is mounted, as the real command does)."""
        r = self.zfs("mount", "-a", "-l")
        assert r.returncode == 0, r

    def power_off(self, reason="test"):
        return self.fake("power", "off", reason)

    def power_on(self):
        return self.fake("power", "on")

    def supervisors(self):
        """{pid: vm} of the fake VM supervisors (delayed starts) that still run."""
        return fake_host.supervisors(self.host)

    def kill_supervisors(self, vm=None):
        """SIGKILL the fake supervisors of vm (of every VM: None): a VM not yet there
        then never appears."""
        fake_host.kill_supervisor(self.host, vm)

    def add_vm(self, name, parent=None, production=True, snapshots=(), running=False,
               dataset=DATASET):
        """A VM copy on this host, in dataset (mounted or not: the files go where the fake
        keeps an unmounted dataset's data)."""
        d = self.host.vm_dir(name, dataset)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "vm_config.json"), "w") as f:
            json.dump({"parent_host": parent or self.name, "production": production,
                       "memory": "1G"}, f)
        path = os.path.join(self.dir, "snapshots.json")
        snaps = json.load(open(path)) if os.path.exists(path) else {}
        snaps[name] = [list(s) for s in snapshots]
        with open(path, "w") as f:
            json.dump(snaps, f)
        if running:
            open(os.path.join(self.dir, "vmm", name), "w").close()


class LocalCluster:
    def __init__(self, base, workers=0, timings=None, debug=True, secret="0123456789abcdef" * 2):
        self.base, self.debug, self.secret = base, debug, secret
        self.timings = dict(FAST if timings is None else timings)
        names = [(f"node{i}", f"127.0.0.{i}", True) for i in (1, 2, 3)]
        names += [(f"worker{i}", f"127.0.0.{3 + i}", False) for i in range(1, workers + 1)]
        self.port = free_port([a for _, a, _ in names])
        self.nodes = {n: Node(self, n, a, c) for n, a, c in names}
        for node in self.nodes.values():
            self._write(node)

    def __getitem__(self, name):
        return self.nodes[name]

    def _write(self, node):
        for d in ("bin", "vms", "vmm", "run", "state"):
            os.makedirs(os.path.join(node.dir, d), exist_ok=True)
        with open(os.path.join(node.dir, "hoster_init_path"), "w") as f:
            f.write(os.path.basename(node.init_marker) + "\n")
        open(node.init_marker, "w").close()
        commands = {}
        fake_host.install(os.path.join(node.dir, "bin"), FAKE_COMMANDS)
        b = os.path.join(node.dir, "bin")
        commands = {"zfs": [f"{b}/zfs"], "vm_start": [f"{b}/hoster", "vm", "start", "{vm}"],
                    "vm_cireset": [f"{b}/hoster", "vm", "cireset", "{vm}"],
                    "vm_destroy": [f"{b}/bhyvectl", "--destroy", "--vm={vm}"],
                    "reboot": [f"{b}/shutdown", "-r", "now"], "reboot_now": [f"{b}/reboot", "-nq"],
                    "free_memory": [f"{b}/sysctl", "-n", "vm.stats.vm.v_free_count",
                                    "hw.pagesize"],
                    "hostname": [f"{b}/sysctl", "-n", "kern.hostname"],  # NODE/hostname
                    "vm_kill_supervisor": [f"{b}/pkill", "-9", "-f",
                                           "/vm_supervisor_service for {vm}$"]}
        cfg = {"hostname": node.name, "secret": self.secret,
               "candidates": [{"hostname": n.name, "protocol": "http", "address": n.address,
                               "port": self.port} for n in self.nodes.values() if n.candidate],
               "listen_address": node.address, "vm_datasets": ["zroot/vm-encrypted"],
               "vmm_dir": os.path.join(node.dir, "vmm"), "commands": commands,
               "run_dir": node.run_dir, "state_dir": node.state_dir, "log_file": node.log_file,
               "hoster_config_dir": node.dir,  # Hoster's files: never the machine's
               "hoster_init_file": node.init_marker,
               # a start is confirmed after 1 s (the default 3 s would slow every test);
               # a test's timings may override both
               "start_confirm": 1, "start_timeout": 10}
        if not node.candidate:
            cfg.update(address=node.address, port=self.port)
        cfg.update(self.timings)
        with open(node.config, "w") as f:
            json.dump(cfg, f, indent=2)

    def start_all(self, names=None):
        for n in names or self.nodes:
            self.nodes[n].start()

    def wait_for(self, cond, timeout, interval=0.1):
        """Poll cond() until it returns a true value or timeout (s) passes; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v or time.monotonic() >= deadline:
                return v
            time.sleep(interval)

    def managers(self):
        """{node: manager reported by its status --json} for running nodes."""
        return {n: s.get("manager") for n in self.nodes
                if (s := self.nodes[n].status()).get("api_pid")}

    def teardown(self):
        """stop_all(), reap our children, and SIGKILL whatever started for this cluster
        still runs 10 s later (only processes whose command line names its folder).
        Returns (gone, left): whether everything stopped by itself, and what was killed."""
        try:
            self.stop_all()
        finally:
            for node in self.nodes.values():
                if node.proc is not None:
                    if node.proc.poll() is None:
                        node.proc.kill()
                        node.proc.wait(5)
                    if node.proc.stderr is not None:
                        node.proc.stderr.close()
            gone = self.wait_for(lambda: not our_pids(self.base), 10, interval=0.05)
            left = our_pids(self.base)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return gone, left

    def stop_all(self):
        """Stop everything this cluster started: agents (SIGTERM, then SIGKILL) and watchdogs."""
        for node in self.nodes.values():
            node.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node in self.nodes.values():
            if node.proc is not None:
                try:
                    node.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(5)
            for which in ("hoster_ha", "ha_watchdog"):
                node.signal(signal.SIGKILL if which == "hoster_ha" else signal.SIGTERM, which)
            node.kill_supervisors()
