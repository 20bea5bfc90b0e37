#!/usr/bin/env python3
"""Fake host commands for tests and the demo: zfs, hoster, bhyvectl, shutdown, reboot, sysctl.

Installed as symlinks named after the command in NODE/bin/; the state lives in NODE/
(the folder above bin/), so each fake host is one folder:

    NODE/vms/NAME/vm_config.json   a VM dataset's mountpoint (dataset DS/NAME)
    NODE/snapshots.json            {"NAME": [[snapname, creation, guid], ...]}  oldest first
    NODE/vmm/NAME                  a running VM (what /dev/vmm/NAME is on FreeBSD)
    NODE/calls.log                 every call: "<unix time> <argv...>" (reboots included)

Nothing here touches the real machine: a fake reboot only records itself.

Precise times (the fault tests rebuild from calls.log when each VM was live where):
`hoster vm start NAME` is logged under the host lock immediately *before* NODE/vmm/NAME
is created, `bhyvectl --destroy --vm=NAME` immediately *after* it is removed, so a
VM's live interval [start line, destroy line] never understates the truth.

Opt-in, for the network-namespace fault tests (tests/netns.py):

    NODE/reboot_takes_host_down  marker: a fake shutdown/reboot takes the host down the way
                                 a real one would: SIGKILL the node's agent and watchdog
                                 (pids from NODE/run/), remove every NODE/vmm entry
                                 ("<t> vm gone NAME" each), write NODE/down, log
                                 "<t> down <command>".  Without the marker a reboot only
                                 records itself (loopback tests, demo).
    NODE/start_delay             seconds a `hoster vm start` takes before the VM exists
                                 (logged as "<t> pending hoster vm start NAME" at once)
    NODE/destroy_delay           seconds a `bhyvectl --destroy` takes (a big guest)
    NODE/down                    the host is off: a start is refused
                                 ("<t> refused hoster vm start NAME"), exit 1
    NODE/boot                    boot counter; a start begun before a reboot never
                                 completes after it
    NODE/free_pages              the free page count `sysctl -n vm.stats.vm.v_free_count
                                 hw.pagesize` reports (the page size stays 4096); without
                                 it every node reports 262144 pages (1 GiB)

and one extra command, never named in an agent's `commands` (the test harness runs it):

    power off REASON...          the host loses power / is reset by its hardware watchdog:
                                 as a reboot with the marker, logged "<t> down power off ..."
    power on                     the host boots again: NODE/down removed, boot counter + 1,
                                 logged "<t> up power on"
"""
import fcntl
import json
import os
import signal
import sys
import time

node = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0])))
cmd = os.path.basename(sys.argv[0])
args = sys.argv[1:]
vms_dir = os.path.join(node, "vms")
vmm_dir = os.path.join(node, "vmm")
CALLS = os.path.join(node, "calls.log")
DOWN = os.path.join(node, "down")
BOOT = os.path.join(node, "boot")


def record(line, t=None):
    """Append "<unix time> LINE" to calls.log (one write, O_APPEND)."""
    with open(CALLS, "a") as f:
        f.write(f"{time.time() if t is None else t:.6f} {line}\n")


def read_text(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


class HostLock:
    """NODE/host.lock (flock): starts, destroys and power changes happen one at a time."""

    def __enter__(self):
        self.f = open(os.path.join(node, "host.lock"), "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


PRECISE = ((cmd == "hoster" and args[:2] == ["vm", "start"] and len(args) == 3) or
           (cmd == "bhyvectl" and len(args) == 2 and args[0] == "--destroy"
            and args[1].startswith("--vm=")) or cmd == "power")
if not PRECISE:
    record(f"{cmd} {' '.join(args)}")


def vm_names():
    try:
        return sorted(os.listdir(vms_dir))
    except FileNotFoundError:
        return []


def snapshots():
    try:
        with open(os.path.join(node, "snapshots.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def ours(pid):
    """True if pid is this node's agent or watchdog (its command line names a file of
    this node, the config).  Where /proc is missing, trust the pid file."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")
    except OSError:
        return False
    return any(a.startswith(node + os.sep) for a in argv) and \
        any(a.endswith(("hoster_ha.py", "ha_watchdog.py")) for a in argv)


def take_down(reason):
    """Everything a real reboot (or power loss) ends: the node's agent and watchdog, and
    its running VMs.  The caller (a child of one of them) exits right after."""
    with HostLock():
        for which in ("hoster_ha.pid", "ha_watchdog.pid"):
            try:
                pid = int(read_text(os.path.join(node, "run", which), "0"))
            except ValueError:
                continue
            if pid > 1 and pid != os.getpid() and ours(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            names = sorted(os.listdir(vmm_dir))
        except FileNotFoundError:
            names = []
        for name in names:
            try:
                os.unlink(os.path.join(vmm_dir, name))
            except FileNotFoundError:
                continue
            record(f"vm gone {name}")
        t = time.time()
        with open(DOWN, "w") as f:
            f.write(f"{t:.6f} {reason}\n")
        record(f"down {reason}", t)


if cmd == "zfs" and args[:1] == ["list"]:
    ds = args[-1]
    if "snapshot" in args:
        snaps = snapshots()
        rows = []
        for name in vm_names():
            for s in snaps.get(name, []):
                rows.append((s[1], f"{ds}/{name}@{s[0]}\t{s[1]}\t{s[2]}"))
        for _, line in sorted(rows, key=lambda r: r[0]):
            print(line)
    else:
        print(f"{ds}\t{vms_dir}")
        for name in vm_names():
            print(f"{ds}/{name}\t{os.path.join(vms_dir, name)}")
    sys.exit(0)
if cmd == "hoster" and args[:2] == ["vm", "start"] and len(args) == 3:
    name = args[2]
    boot = read_text(BOOT, "0")
    delay = read_text(os.path.join(node, "start_delay"))
    if delay:
        record(f"pending hoster vm start {name}")
        time.sleep(float(delay))
    with HostLock():
        if os.path.exists(DOWN) or read_text(BOOT, "0") != boot:
            record(f"refused hoster vm start {name} (host down or rebooted)")
            print(f"fake hoster: host {os.path.basename(node)} is down", file=sys.stderr)
            sys.exit(1)
        os.makedirs(vmm_dir, exist_ok=True)
        record(f"hoster vm start {name}")
        open(os.path.join(vmm_dir, name), "w").close()
    sys.exit(0)
if cmd == "hoster" and args[:2] == ["vm", "cireset"]:
    sys.exit(0)
if cmd == "bhyvectl" and PRECISE:
    delay = read_text(os.path.join(node, "destroy_delay"))
    if delay:
        time.sleep(float(delay))
    with HostLock():
        try:
            os.unlink(os.path.join(vmm_dir, args[1][5:]))
            ok = True
        except FileNotFoundError:
            ok = False
        record(f"{cmd} {' '.join(args)}")
    if not ok:
        print(f"vm_open: {args[1][5:]} could not be opened: No such file or directory",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
if cmd in ("shutdown", "reboot"):
    # recorded in calls.log above; the real machine is never touched
    if os.path.exists(os.path.join(node, "reboot_takes_host_down")):
        take_down(f"{cmd} {' '.join(args)}")
    sys.exit(0)
if cmd == "power" and args[:1] == ["off"]:
    take_down(" ".join(["power"] + args))
    sys.exit(0)
if cmd == "power" and args == ["on"]:
    with HostLock():
        try:
            boot = int(read_text(BOOT, "0")) + 1
        except ValueError:
            boot = 1
        with open(BOOT, "w") as f:
            f.write(f"{boot}\n")
        try:
            os.unlink(DOWN)
        except FileNotFoundError:
            pass
        record("up power on")
    sys.exit(0)
if cmd == "sysctl":
    pages = read_text(os.path.join(node, "free_pages"))
    print(int(pages) if pages.isdigit() else 262144)
    print(4096)
    sys.exit(0)
print(f"fake {cmd}: unsupported arguments {args}", file=sys.stderr)
sys.exit(64)
