#!/usr/bin/env python3
"""Fake host commands for tests and the demo: zfs, hoster, bhyvectl, shutdown, reboot,
sysctl, hostname, pkill, power (and Hoster's vm_supervisor_service, which `hoster vm
start` runs).

Installed in NODE/bin/ under the command's name by fake_host.install() (a small
script that runs this code with the test's interpreter, without site); the state lives in NODE/
(the folder above bin/), so each fake host is one folder.  Nothing here touches the real
machine: a fake reboot only records itself, and every path the fake reads or writes is
inside NODE (a mountpoint outside NODE is refused).

The default is a happy, initialised host, as before; each file below is a knob a test
sets (tools/localcluster.py has helpers for them).  What the real host does is in
HOSTER-FACTS.md; where the fake models it, it uses the real messages and exit codes.

State and records
    NODE/vms/NAME/vm_config.json   a VM of the default dataset zroot/vm-encrypted (its
                                   mountpoint is NODE/vms; dataset zroot/vm-encrypted/NAME)
    NODE/snapshots.json            {"NAME" or "DATASET": [[snapname, creation, guid], ...]}
                                   oldest first (file order = creation txg order)
    NODE/vmm/NAME                  a running VM (what /dev/vmm/NAME is on FreeBSD)
    NODE/calls.log                 every call: "<unix time> <argv...>" (reboots included)

Precise times (the fault tests rebuild from calls.log when each VM was live where): the
line "hoster vm start NAME" is written under the host lock immediately *before*
NODE/vmm/NAME is created (by `hoster vm start`, `hoster vm start-all`, or the supervisor
of a delayed start), "bhyvectl --destroy --vm=NAME" immediately *after* it is removed,
"vm gone NAME" after it vanished (bhyve died, reboot), so a VM's live interval
[start line, end line] never understates the truth.  "pending hoster vm start NAME": a
start was asked for and the VM does not exist yet; "refused hoster vm start NAME (why)":
a start that will never create it.

ZFS (zfs list / get / mount / unmount / load-key / unload-key / set / inherit / create)
    NODE/zfs.json                  the datasets this host has, written by the fake's own
                                   zfs commands the first time they change something:
                                   {"datasets": {NAME: {"mountpoint": "/abs/path" | "legacy"
                                   | "none", "mounted": bool, "encryption": "off" |
                                   "aes-256-gcm", "keystatus": "available" | "unavailable",
                                   "keylocation": "prompt" | "file:///...", "keyformat":
                                   "passphrase"}}, "children": {DS/VM: {"mountpoint":
                                   "legacy" | "none"}}}.  Without it the host has one
                                   dataset, zroot/vm-encrypted, mounted at NODE/vms,
                                   encrypted with its key loaded (keylocation file://, so
                                   a boot loads it).  Any other dataset does not exist:
                                   `zfs list|get X` exits 1 with "cannot open 'X': dataset
                                   does not exist" on stderr.
    NODE/zfs-unmounted/DS%CHILD    the files of an unmounted (or key-locked) dataset: they
                                   are *not* at its mountpoint, so its children's
                                   vm_config.json files do not exist on disk until it is
                                   mounted again ("/" in dataset names is "%" here).
    Children of a dataset are the VM datasets DS/NAME: the directories in its data.  A child
    is mounted when its folder is in its parent's mounted folder.  `zfs unmount DS`
    unmounts DS and its children; `zfs mount DS` mounts DS only (children stay unmounted:
    run `zfs mount -a`, or mount them one by one); `zfs mount -l` / `zfs load-key` load
    a key (no passphrase is asked); `zfs unload-key` needs the dataset unmounted ("is busy"
    otherwise); `zfs set mountpoint=legacy|none|/path` on a dataset or a VM child (a
    legacy/none dataset is unmounted, and a child inherits legacy/none); `zfs set
    keylocation=prompt` makes the next boot (`power on`) leave the key unloaded;
    `zfs create [-o mountpoint=|encryption=on|keylocation=|keyformat=] DS` makes a dataset
    (a new top-level one is mounted at NODE/mnt/DS by default).
    zfs list/get honour -H -p -o -t -d -r -s -S (headers and aligned columns without -H,
    dates without -p; options before operands, as FreeBSD's getopt wants);
    `zfs inherit mountpoint DS/VM` undoes a child's legacy/none;
    `zfs get -H -p -o name,property,value mounted,keystatus DS...` answers per dataset.
    A snapshot of DS/NAME comes from snapshots.json ("NAME" or the full dataset name as
    key); snapshots are listed even of locked datasets, as on ZFS.

Hoster (hoster init / vm start / vm start-all / vm stop / vm cireset)
    NODE/hostname                  this host's kern.hostname: what Hoster compares a VM's
                                   parent_host with (exact match) and what `sysctl -n
                                   kern.hostname` / `hostname` print.  Default: "hostname"
                                   of NODE/ha_config.json, else the folder's name.
    NODE/hoster_init_path          the path of Hoster's init marker (the real one is
                                   /var/run/hoster_init; give a path inside NODE).  When this
                                   knob exists, every `hoster vm ...` prints " 🚫 ERROR: ...
                                   Please, execute `hoster init` to start using this
                                   utility" on stdout and exits 1 until the marker exists;
                                   `hoster init` creates it; `power on` removes it (/var/run
                                   is emptied at boot).  Without the knob the host is always
                                   initialised (as before).
    NODE/host_config.json          Hoster's host config; its "active_datasets" are the
                                   datasets Hoster looks for VMs in (default: every dataset
                                   of zfs.json).
    NODE/hoster_ansi               marker: Hoster's messages carry ANSI colour codes (the
                                   real emojlog prints emoji and no ANSI codes; this is for
                                   tests of code that must strip them).
    Hoster prints its messages, errors included, on stdout (emojlog format: " 🚫 ERROR:
    🕔 <time>: 📄 <message>"), stderr stays empty, and a successful start prints nothing.
    `hoster vm start NAME` refuses (exit 1): not initialised; "vm is already running";
    "vm doesn't exist" (no vm_config.json in a mounted active dataset); "cannot start a
    backup VM on this system (change the parent host first or execute cireset)" when
    parent_host != this host's name.  `hoster vm
    start-all [-p|--production-only] [-t|--wait-time N]` starts every VM that is not
    running and not a backup (only production ones with -p: Hoster's start-all without -p
    starts non-production VMs too).  `hoster vm cireset NAME` sets parent_host to this
    host's name and writes failover_strategy (change_parent unless it is cireset), as
    Hoster's rewrite does ("vm has to be stopped" if it runs).  `hoster vm stop [-f] [-c] NAME`
    ("VM is already offline" if not running; -f destroys it; -c kills its supervisor).
    NODE/vm_start.json             how starts behave, per VM or for all ("*"):
                                   {"*" | NAME: {"appear_after": s, "dies_after": s,
                                   "times": n}}.  appear_after: `hoster vm start` returns 0
                                   at once and the VM appears s seconds later (a detached
                                   fake supervisor, argv "NODE/bin/vm_supervisor_service
                                   for NAME" like Hoster's, creates it; killing it first
                                   means the VM never appears).  dies_after: the VM
                                   vanishes s seconds after it appeared (bhyve died;
                                   "vm gone NAME").  times: the entry applies to the next n
                                   starts of that VM, then is dropped.  A VM's own entry
                                   overrides "*" field by field.  Default: no entry, the VM
                                   exists when `hoster vm start` returns (as before).
                                   A supervisor is NODE/supervisors/NAME.PID while it
                                   runs (LocalCluster.stop_all kills them).
    NODE/start_delay               seconds `hoster vm start` itself takes before the VM
                                   exists (logged as "<t> pending hoster vm start NAME" at
                                   once); it returns after the VM exists
    NODE/destroy_delay             seconds a `bhyvectl --destroy` takes (a big guest)
    `bhyvectl --destroy --vm=NAME` of a VM that does not exist exits 1 ("vm_open: NAME
    could not be opened: No such file or directory" on stderr).
    `pkill [-SIGNAL] -f PATTERN` signals this host's fake supervisors whose command line
    matches PATTERN (never another process); exit 0 if one matched, 1 if none.
    NODE/pkill_fails               marker: pkill signals nothing and exits 3 ("pkill:
                                   cannot read process table", a broken host)

Power, for the network-namespace fault tests (tests/netns.py) and boot tests
    NODE/reboot_takes_host_down  marker: a fake shutdown/reboot takes the host down the way
                                 a real one would: SIGKILL the node's agent and watchdog
                                 (pids from NODE/run/) and the fake supervisors, remove
                                 every NODE/vmm entry ("<t> vm gone NAME" each), write
                                 NODE/down, log "<t> down <command>".  Without the marker
                                 a reboot only records itself (loopback tests, demo).
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
                                 the init marker removed (if NODE/hoster_init_path is set),
                                 every dataset unmounted, keys with keylocation=prompt
                                 unloaded, then every dataset whose key is available
                                 mounted (`zfs mount -a` of rc.d/zfs); logged
                                 "<t> up power on"
"""
import os
import sys

# Every fake command is a new process: the code lives in tools/fake_host.py, whose
# bytecode Python caches (tools/__pycache__, git-ignored) even where
# PYTHONDONTWRITEBYTECODE is set; compiling it on every call cost ~25 ms.
sys.dont_write_bytecode = False
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from fake_host import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv))
