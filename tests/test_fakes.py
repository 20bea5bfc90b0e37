"""The fake host (tools/fake_host_cmd.py) behaves like a real Hoster host (HOSTER-FACTS.md).

Every knob is driven directly through the fake's commands, on node folders made by
tools/localcluster.py; no agent runs.  The first tests pin today's defaults (what the
agent's tests rely on), the others one knob each.
"""

import json
import os
import re
import stat
import time

import pytest

from localcluster import DATASET, LocalCluster, our_pids

LIST_FS = ["list", "-H", "-p", "-o", "name,mountpoint", "-t", "filesystem", "-d", "1"]
LIST_SNAPS = ["list", "-H", "-p", "-t", "snapshot", "-o", "name,creation,guid", "-s",
              "creation", "-r"]
GET_STATE = ["get", "-H", "-p", "-o", "name,property,value", "mounted,keystatus"]
EMOJLOG = re.compile(r"^ 🚫 ERROR:   🕔 \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: 📄 (.*)$")
INIT_MSG = "Please, execute `hoster init` to start using this utility"
BACKUP_MSG = ("cannot start a backup VM on this system (change the parent host first or "
              "execute cireset)")


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(str(tmp_path))
    yield c
    gone, left = c.teardown()
    assert gone and not left, left


@pytest.fixture
def node(cluster):
    return cluster["node1"]


def wait_for(cond, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def ok(r):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def error_of(r):
    """Hoster's error: exit 1, one emojlog line on stdout, nothing on stderr."""
    assert r.returncode == 1 and r.stderr == "", (r.returncode, r.stdout, r.stderr)
    m = EMOJLOG.match(r.stdout.rstrip("\n"))
    assert m, r.stdout
    return m.group(1)


def live(node, vm):
    return os.path.exists(os.path.join(node.dir, "vmm", vm))


def config(node, vm):
    return os.path.join(node.dir, "vms", vm, "vm_config.json")


def state(node, *datasets):
    out = ok(node.zfs(*GET_STATE, *datasets))
    return {tuple(line.split("\t")[:2]): line.split("\t")[2] for line in out.splitlines()}


# -- defaults: today's happy host ---------------------------------------------------------

def test_default_zfs_answers_are_unchanged(node):
    node.add_vm("vm2", snapshots=[("b", 150, "21")])
    node.add_vm("vm1", snapshots=[("s1", 100, "11"), ("s2", 200, "12")])
    vms = os.path.join(node.dir, "vms")
    assert ok(node.zfs(*LIST_FS, DATASET)) == (
        f"{DATASET}\t{vms}\n{DATASET}/vm1\t{vms}/vm1\n{DATASET}/vm2\t{vms}/vm2\n")
    assert ok(node.zfs(*LIST_SNAPS, DATASET)) == (
        f"{DATASET}/vm1@s1\t100\t11\n{DATASET}/vm2@b\t150\t21\n{DATASET}/vm1@s2\t200\t12\n")
    assert state(node, DATASET) == {(DATASET, "mounted"): "yes",
                                    (DATASET, "keystatus"): "available"}


def test_default_start_is_there_on_return_and_destroy_of_nothing_fails(node):
    node.add_vm("vm1")
    r = node.hoster("vm", "start", "vm1")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")   # Hoster prints nothing
    assert live(node, "vm1") and node.supervisors() == {}
    ok(node.fake("bhyvectl", "--destroy", "--vm=vm1"))
    assert not live(node, "vm1")
    r = node.fake("bhyvectl", "--destroy", "--vm=vm1")
    assert r.returncode == 1
    assert r.stderr == "vm_open: vm1 could not be opened: No such file or directory\n"
    kinds = [line.split(" ", 1)[1] for line in node.calls().splitlines()]
    assert kinds == ["hoster vm start vm1", "bhyvectl --destroy --vm=vm1",
                     "bhyvectl --destroy --vm=vm1"]


def test_default_sysctl_and_hostname(node):
    assert ok(node.fake("sysctl", "-n", "vm.stats.vm.v_free_count", "hw.pagesize")) == \
        "262144\n4096\n"
    assert ok(node.fake("sysctl", "-n", "kern.hostname")) == "node1\n"
    assert ok(node.fake("hostname")) == "node1\n"


def test_a_folder_without_knobs_is_initialised(tmp_path):
    """Hand-made fake hosts (tests/netns.py) have no init knob: always initialised."""
    c = LocalCluster(str(tmp_path))
    n = c["node2"]
    os.unlink(os.path.join(n.dir, "hoster_init_path"))
    os.unlink(n.init_marker)
    n.add_vm("vm1")
    ok(n.hoster("vm", "start", "vm1"))
    assert live(n, "vm1")


# -- zfs options --------------------------------------------------------------------------

def test_zfs_missing_dataset_fails_like_zfs(node):
    for args in (LIST_FS, LIST_SNAPS, GET_STATE):
        r = node.zfs(*args, "tank/vms")
        assert (r.returncode, r.stdout, r.stderr) == (
            1, "", "cannot open 'tank/vms': dataset does not exist\n"), args
    r = node.zfs(*GET_STATE, DATASET, "tank/vms")       # the others are still answered
    assert r.returncode == 1 and r.stdout.count("\n") == 2
    assert r.stderr == "cannot open 'tank/vms': dataset does not exist\n"
    r = node.zfs("list", "-o", "name,bogus", DATASET)
    assert r.returncode == 2 and "invalid property 'bogus'" in r.stderr


def test_zfs_list_options(node):
    node.add_vm("vm1", snapshots=[("s1", 100, "11"), ("s2", 200, "12")])
    node.add_vm("vm2", snapshots=[("s0", 200, "21")])
    assert ok(node.zfs("list", "-H", "-o", "name", DATASET)) == f"{DATASET}\n"   # depth 0
    assert ok(node.zfs("list", "-H", "-o", "name", "-r", DATASET)).split() == [
        DATASET, f"{DATASET}/vm1", f"{DATASET}/vm2"]
    assert ok(node.zfs("list", "-H", "-o", "name", "-t", "all", "-d", "1",
                       f"{DATASET}/vm1")).split() == [
        f"{DATASET}/vm1", f"{DATASET}/vm1@s1", f"{DATASET}/vm1@s2"]
    # -t snapshot of one dataset without -r: its own snapshots only
    assert ok(node.zfs("list", "-H", "-o", "name", "-t", "snapshot",
                       f"{DATASET}/vm2")).split() == [f"{DATASET}/vm2@s0"]
    # -S: descending; ties keep creation-txg order (file order)
    assert ok(node.zfs("list", "-H", "-o", "name", "-t", "snap", "-S", "creation", "-r",
                       DATASET)).split() == [f"{DATASET}/vm1@s2", f"{DATASET}/vm2@s0",
                                             f"{DATASET}/vm1@s1"]
    # without -H: a header and aligned columns; without -p: dates, not epoch seconds
    out = ok(node.zfs("list", "-t", "snapshot", "-o", "name,creation", f"{DATASET}/vm1"))
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "CREATION"] and "\t" not in out
    assert re.search(r"\b1970$", lines[1]) and "100" not in lines[1]
    assert ok(node.zfs("list", "-H", "-p", "-o", "creation", "-t", "snapshot",
                       f"{DATASET}/vm1")).split() == ["100", "200"]
    # combined flags, guid decimal
    assert ok(node.zfs("list", "-Hp", "-o", "guid", "-t", "snapshot",
                       f"{DATASET}/vm2")) == "21\n"


def test_zfs_get_several_datasets_and_fields(node):
    node.add_vm("vm1")
    assert state(node, DATASET, f"{DATASET}/vm1") == {
        (DATASET, "mounted"): "yes", (DATASET, "keystatus"): "available",
        (f"{DATASET}/vm1", "mounted"): "yes", (f"{DATASET}/vm1", "keystatus"): "available"}
    out = ok(node.zfs("get", "-r", "-H", "-o", "name,value", "mountpoint", DATASET))
    assert out.splitlines() == [f"{DATASET}\t{node.dir}/vms",
                                f"{DATASET}/vm1\t{node.dir}/vms/vm1"]
    out = ok(node.zfs("get", "mountpoint", f"{DATASET}/vm1")).splitlines()
    assert out[0].split() == ["NAME", "PROPERTY", "VALUE", "SOURCE"]
    assert out[1].endswith(f"inherited from {DATASET}")


# -- locked and unmounted datasets ----------------------------------------------------------

def test_locked_dataset_hides_its_vms_until_unlocked(node):
    node.add_vm("vm1", snapshots=[("s1", 100, "11")])
    node.add_vm("vm2")
    node.lock_dataset()
    assert not os.path.exists(config(node, "vm1"))
    assert not os.path.exists(os.path.join(node.dir, "vms"))
    assert state(node, DATASET, f"{DATASET}/vm1") == {
        (DATASET, "mounted"): "no", (DATASET, "keystatus"): "unavailable",
        (f"{DATASET}/vm1", "mounted"): "no", (f"{DATASET}/vm1", "keystatus"): "unavailable"}
    # still listed (names, mountpoint property, snapshots), as zfs does
    assert len(ok(node.zfs(*LIST_FS, DATASET)).splitlines()) == 3
    assert ok(node.zfs(*LIST_SNAPS, DATASET)) == f"{DATASET}/vm1@s1\t100\t11\n"
    # Hoster does not see them
    assert error_of(node.hoster("vm", "start", "vm1")) == "vm doesn't exist"
    # a VM added while locked lands in the hidden data
    node.add_vm("vm3")
    assert not os.path.exists(config(node, "vm3"))
    r = node.zfs("mount", DATASET)
    assert r.returncode == 1
    assert r.stderr == f"cannot mount '{DATASET}': encryption key not loaded\n"
    ok(node.zfs("load-key", DATASET))
    r = node.zfs("load-key", DATASET)
    assert r.returncode == 1 and "Key already loaded" in r.stderr
    ok(node.zfs("mount", DATASET))           # the parent only: children stay unmounted
    assert os.path.isdir(os.path.join(node.dir, "vms"))
    assert not os.path.exists(config(node, "vm1"))
    assert state(node, f"{DATASET}/vm1")[(f"{DATASET}/vm1", "mounted")] == "no"
    node.unlock_dataset()                    # zfs mount -a -l
    for vm in ("vm1", "vm2", "vm3"):
        assert os.path.exists(config(node, vm)), vm
    assert state(node, f"{DATASET}/vm1")[(f"{DATASET}/vm1", "mounted")] == "yes"


def test_unload_key_needs_unmounted_and_unmounted_is_not_locked(node):
    node.add_vm("vm1")
    r = node.zfs("unload-key", DATASET)
    assert r.returncode == 1 and r.stderr == f"Key unload error: '{DATASET}' is busy.\n"
    ok(node.zfs("unmount", DATASET))
    assert state(node, DATASET) == {(DATASET, "mounted"): "no",
                                    (DATASET, "keystatus"): "available"}
    assert not os.path.exists(config(node, "vm1"))
    ok(node.zfs("mount", "-a"))
    assert os.path.exists(config(node, "vm1"))


def test_one_vm_dataset_unmounted(node):
    node.add_vm("vm1")
    node.add_vm("vm2")
    ok(node.zfs("unmount", f"{DATASET}/vm2"))
    assert os.path.exists(config(node, "vm1")) and not os.path.exists(config(node, "vm2"))
    assert state(node, f"{DATASET}/vm2")[(f"{DATASET}/vm2", "mounted")] == "no"
    ok(node.zfs("mount", f"{DATASET}/vm2"))
    assert os.path.exists(config(node, "vm2"))


def test_legacy_and_none_mountpoints(node):
    node.add_vm("vm1")
    node.add_vm("vm2")
    ok(node.zfs("set", "mountpoint=none", f"{DATASET}/vm2"))
    assert ok(node.zfs(*LIST_FS, DATASET)).splitlines()[2] == f"{DATASET}/vm2\tnone"
    assert not os.path.exists(config(node, "vm2"))
    ok(node.zfs("inherit", "mountpoint", f"{DATASET}/vm2"))
    ok(node.zfs("mount", f"{DATASET}/vm2"))
    assert os.path.exists(config(node, "vm2"))
    ok(node.zfs("set", "mountpoint=legacy", DATASET))
    assert ok(node.zfs(*LIST_FS, DATASET)) == (
        f"{DATASET}\tlegacy\n{DATASET}/vm1\tlegacy\n{DATASET}/vm2\tlegacy\n")
    assert not os.path.exists(config(node, "vm1"))
    assert state(node, DATASET)[(DATASET, "mounted")] == "no"
    r = node.zfs("mount", DATASET)
    assert r.returncode == 1 and "legacy" in r.stderr
    ok(node.zfs("set", f"mountpoint={node.dir}/vms", DATASET))
    ok(node.zfs("mount", "-a"))
    assert os.path.exists(config(node, "vm1")) and os.path.exists(config(node, "vm2"))
    r = node.zfs("set", "mountpoint=/var/tmp/elsewhere", DATASET)   # never outside NODE
    assert r.returncode == 1 and "outside" in r.stderr


def test_boot_locks_prompt_keys_and_mounts_the_rest(node):
    node.add_vm("vm1")
    ok(node.zfs("create", "-o", "encryption=off", "tank/vms"))
    node.add_vm("vm9", dataset="tank/vms")
    mnt = os.path.join(node.dir, "mnt", "tank", "vms")
    assert os.path.exists(os.path.join(mnt, "vm9", "vm_config.json"))
    assert state(node, "tank/vms") == {("tank/vms", "mounted"): "yes",
                                       ("tank/vms", "keystatus"): "-"}
    ok(node.power_on())                      # keylocation file://: the key loads at boot
    assert os.path.exists(config(node, "vm1"))
    ok(node.zfs("set", "keylocation=prompt", DATASET))
    ok(node.power_off("test"))
    ok(node.power_on())
    assert not os.path.exists(config(node, "vm1"))
    assert state(node, DATASET)[(DATASET, "keystatus")] == "unavailable"
    assert os.path.exists(os.path.join(mnt, "vm9", "vm_config.json"))
    node.unlock_dataset()
    assert os.path.exists(config(node, "vm1"))


# -- hoster: init, identity, backups, start-all, cireset, stop ----------------------------

def test_hoster_refuses_every_vm_command_until_init(node):
    node.add_vm("vm1")
    node.set_initialised(False)
    for args in (("vm", "start", "vm1"), ("vm", "start-all"), ("vm", "cireset", "vm1"),
                 ("vm", "stop", "vm1")):
        assert error_of(node.hoster(*args)) == INIT_MSG, args
    assert not live(node, "vm1")
    assert "refused hoster vm start vm1 (hoster init not run)" in node.calls()
    out = ok(node.hoster("init"))
    assert f"State file {node.init_marker} has been created" in out
    assert stat.S_IMODE(os.stat(node.init_marker).st_mode) == 0o600
    ok(node.hoster("vm", "start", "vm1"))
    assert live(node, "vm1")
    ok(node.power_off("test"))
    ok(node.power_on())                      # /var/run is emptied at boot
    assert not os.path.exists(node.init_marker)
    assert error_of(node.hoster("vm", "start", "vm1")) == INIT_MSG


def test_init_marker_outside_the_fake_host_is_refused(node):
    with open(os.path.join(node.dir, "hoster_init_path"), "w") as f:
        f.write("/var/run/hoster_init\n")
    r = node.hoster("vm", "start", "vm1")
    assert r.returncode == 64 and "outside" in r.stderr


def test_ansi_knob(node):
    open(os.path.join(node.dir, "hoster_ansi"), "w").close()
    r = node.hoster("vm", "start", "nosuchvm")
    assert r.returncode == 1 and r.stdout.startswith("\033[") and r.stdout.rstrip().endswith(
        "\033[0m")
    assert "vm doesn't exist" in r.stdout


def test_backup_vm_is_refused_and_the_host_name_is_a_knob(node):
    node.add_vm("mine")
    node.add_vm("theirs", parent="node2")
    assert error_of(node.hoster("vm", "start", "theirs")) == BACKUP_MSG
    assert not live(node, "theirs")
    node.set_hostname("node2")
    assert ok(node.fake("sysctl", "-n", "kern.hostname")) == "node2\n"
    assert ok(node.fake("hostname")) == "node2\n"
    assert error_of(node.hoster("vm", "start", "mine")) == BACKUP_MSG
    ok(node.hoster("vm", "start", "theirs"))
    assert live(node, "theirs")
    assert error_of(node.hoster("vm", "start", "theirs")) == "vm is already running"
    node.set_hostname(None)
    assert ok(node.fake("hostname")) == "node1\n"


def test_locked_copy_is_a_backup(node):
    node.add_vm("vm1", parent="__HA_LOCKED_2026-01-01_00-00-00__")
    assert error_of(node.hoster("vm", "start", "vm1")) == BACKUP_MSG


def test_start_all_follows_hosters_rule(node):
    node.add_vm("prod")
    node.add_vm("dev", production=False)
    node.add_vm("moved", parent="node2")
    node.add_vm("locked", parent="__HA_LOCKED_2026-01-01_00-00-00__")
    node.add_vm("running", running=True)
    ok(node.hoster("vm", "start-all", "--production-only"))
    assert sorted(os.listdir(os.path.join(node.dir, "vmm"))) == ["prod", "running"]
    ok(node.hoster("vm", "start-all"))          # without -p: non-production VMs too
    assert sorted(os.listdir(os.path.join(node.dir, "vmm"))) == ["dev", "prod", "running"]
    starts = [ln.split(" ", 1)[1] for ln in node.calls().splitlines() if " vm start " in ln]
    assert starts == ["hoster vm start prod", "hoster vm start dev"]


def test_start_all_skips_a_locked_dataset(node):
    node.add_vm("vm1")
    node.lock_dataset()
    ok(node.hoster("vm", "start-all", "-p"))
    assert not live(node, "vm1")
    node.unlock_dataset()
    ok(node.hoster("vm", "start-all", "-p"))
    assert live(node, "vm1")


def test_cireset_takes_the_vm_and_refuses_a_running_one(node):
    node.add_vm("vm1", parent="node2")
    ok(node.hoster("vm", "cireset", "vm1"))
    with open(config(node, "vm1")) as f:
        cfg = json.load(f)
    assert cfg["parent_host"] == "node1" and cfg["production"] is True
    assert cfg["failover_strategy"] == "change_parent"      # Hoster writes its default
    ok(node.hoster("vm", "start", "vm1"))
    assert error_of(node.hoster("vm", "cireset", "vm1")) == "vm has to be stopped"
    assert error_of(node.hoster("vm", "cireset", "nope")) == "sorry, could not find this VM"


def test_stop(node):
    node.add_vm("vm1")
    assert error_of(node.hoster("vm", "stop", "vm1")) == "VM is already offline: vm1"
    ok(node.hoster("vm", "start", "vm1"))
    ok(node.hoster("vm", "stop", "-f", "vm1"))
    assert not live(node, "vm1")


# -- starts that complete late, or die ---------------------------------------------------

def test_start_returns_before_the_vm_exists(node):
    node.add_vm("vm1")
    node.set_start("vm1", appear_after=0.6)
    t0 = time.monotonic()
    r = node.hoster("vm", "start", "vm1")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert not live(node, "vm1")
    assert list(node.supervisors().values()) == ["vm1"]
    assert wait_for(lambda: live(node, "vm1"), 10)
    assert time.monotonic() - t0 >= 0.6
    assert wait_for(lambda: not node.supervisors(), 10)
    lines = [ln.split(" ", 1)[1] for ln in node.calls().splitlines()]
    assert lines == ["pending hoster vm start vm1", "hoster vm start vm1"]


def test_a_late_vm_appears_after_a_failed_destroy(node):
    """The real hazard: `bhyvectl --destroy` before bhyve exists fails, and the VM
    appears afterwards anyway."""
    node.add_vm("vm1")
    node.set_start("vm1", appear_after=0.5)
    ok(node.hoster("vm", "start", "vm1"))
    assert node.fake("bhyvectl", "--destroy", "--vm=vm1").returncode == 1
    assert wait_for(lambda: live(node, "vm1"), 10)


def test_killing_the_supervisor_prevents_the_vm(node):
    node.add_vm("vm1")
    node.set_start("vm1", appear_after=0.5)
    ok(node.hoster("vm", "start", "vm1"))
    node.kill_supervisors("vm1")
    assert wait_for(lambda: not node.supervisors(), 5)
    assert not wait_for(lambda: live(node, "vm1"), 1.0)    # past the 0.5 s it needed


def test_vm_dies_after_it_appeared(node):
    node.add_vm("vm1")
    node.add_vm("vm2")
    node.set_start("vm1", appear_after=0.2, dies_after=0.5)
    node.set_start("vm2", dies_after=0.5)          # there on return, gone 0.5 s later
    ok(node.hoster("vm", "start", "vm1"))
    ok(node.hoster("vm", "start", "vm2"))
    assert live(node, "vm2")
    assert wait_for(lambda: live(node, "vm1"), 10)
    assert wait_for(lambda: not live(node, "vm1") and not live(node, "vm2"), 10)
    assert wait_for(lambda: not node.supervisors(), 10)
    calls = node.calls()
    assert "vm gone vm1" in calls and "vm gone vm2" in calls


def test_start_knob_for_every_vm_and_times(node):
    node.add_vm("vm1")
    node.add_vm("vm2")
    node.set_start("*", appear_after=0.3, times=1)
    ok(node.hoster("vm", "start", "vm1"))
    assert not live(node, "vm1")                    # the one delayed start
    ok(node.hoster("vm", "start", "vm2"))
    assert live(node, "vm2")                        # back to the default
    assert wait_for(lambda: live(node, "vm1"), 10)
    node.set_start("*", appear_after=30)
    node.set_start("vm1", dies_after=0.2)           # field by field over "*"
    ok(node.fake("bhyvectl", "--destroy", "--vm=vm1"))
    ok(node.hoster("vm", "start", "vm1"))
    assert not live(node, "vm1")
    node.clear_start()
    node.kill_supervisors()


def test_power_off_ends_pending_starts(node):
    node.add_vm("vm1")
    node.set_start("vm1", appear_after=0.3)
    ok(node.hoster("vm", "start", "vm1"))
    ok(node.power_off("test"))
    assert wait_for(lambda: not node.supervisors(), 5)
    ok(node.power_on())
    assert not wait_for(lambda: live(node, "vm1"), 0.8)


def test_teardown_reaps_pending_supervisors(tmp_path):
    c = LocalCluster(str(tmp_path))
    n = c["node3"]
    n.add_vm("vm1")
    n.set_start("vm1", appear_after=300)
    ok(n.hoster("vm", "start", "vm1"))
    assert our_pids(str(tmp_path))
    gone, left = c.teardown()
    assert gone and not left and not our_pids(str(tmp_path))
