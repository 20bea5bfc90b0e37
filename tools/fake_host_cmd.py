#!/usr/bin/env python3
"""Fake host commands for tests and the demo: zfs, hoster, bhyvectl, shutdown, reboot, sysctl.

Installed as symlinks named after the command in NODE/bin/; the state lives in NODE/
(the folder above bin/), so each fake host is one folder:

    NODE/vms/NAME/vm_config.json   a VM dataset's mountpoint (dataset DS/NAME)
    NODE/snapshots.json            {"NAME": [[snapname, creation, guid], ...]}  oldest first
    NODE/vmm/NAME                  a running VM (what /dev/vmm/NAME is on FreeBSD)
    NODE/calls.log                 every call: "<unix time> <argv...>" (reboots included)

Nothing here touches the real machine: a fake reboot only records itself.
"""
import json
import os
import sys
import time

node = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0])))
cmd = os.path.basename(sys.argv[0])
args = sys.argv[1:]
vms_dir = os.path.join(node, "vms")
vmm_dir = os.path.join(node, "vmm")

with open(os.path.join(node, "calls.log"), "a") as f:
    f.write(f"{time.time():.3f} {cmd} {' '.join(args)}\n")


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
    os.makedirs(vmm_dir, exist_ok=True)
    open(os.path.join(vmm_dir, args[2]), "w").close()
    sys.exit(0)
if cmd == "hoster" and args[:2] == ["vm", "cireset"]:
    sys.exit(0)
if cmd == "bhyvectl" and len(args) == 2 and args[0] == "--destroy" and args[1].startswith("--vm="):
    try:
        os.unlink(os.path.join(vmm_dir, args[1][5:]))
    except FileNotFoundError:
        print(f"vm_open: {args[1][5:]} could not be opened: No such file or directory",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
if cmd in ("shutdown", "reboot"):
    sys.exit(0)  # recorded in calls.log above; the real machine is never touched
if cmd == "sysctl":
    print(262144)
    print(4096)
    sys.exit(0)
print(f"fake {cmd}: unsupported arguments {args}", file=sys.stderr)
sys.exit(64)
