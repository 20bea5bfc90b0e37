"""`hoster_ha.py doctor` (issue 11, item 12): one line per check of this host, ✓/✗ and the fix.

Every host path doctor reads comes from the config (hoster_config_dir, hoster_init_file,
vmm_dir, run_dir) or a host command (commands.zfs, commands.hostname), so each test builds a
host in tmp_path: a fake `zfs get` that answers from a JSON file, an init marker, a vmm
folder, a syslog socket of its own (SYSLOG_SOCKETS patched), and fake kernel watchdogs
injected into doctor().  Nothing of the real machine is read or touched, /dev/fido included.
"""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import pytest  # noqa: E402

import hoster_ha  # noqa: E402
from localcluster import LocalCluster  # noqa: E402

AGENT = os.path.join(ROOT, "hoster_ha.py")
SECRET = "0123456789abcdef0123456789abcdef"
DATASETS = ["zroot/vm-encrypted", "zroot/vm-unencrypted"]

# `zfs get -H -p -o name,property,value mounted,keystatus DS`, answered from STATE (JSON):
# {"DS": {"mounted": "yes", "keystatus": "available"}}; a dataset not there does not exist.
FAKE_ZFS = r"""
import json, sys
state, args = sys.argv[1], sys.argv[2:]
with open(state) as f:
    datasets = json.load(f)
assert args[:6] == ["get", "-H", "-p", "-o", "name,property,value", "mounted,keystatus"], args
ds = args[6]
if ds not in datasets:
    print(f"cannot open '{ds}': dataset does not exist", file=sys.stderr)
    sys.exit(1)
for prop in ("mounted", "keystatus"):
    print(f"{ds}\t{prop}\t{datasets[ds][prop]}")
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class FakeKernel:
    def __init__(self, error=None):
        self.error, self.device, self.seconds, self.checked = error, "/fake/fido", 17.18, 0

    def check(self):
        self.checked += 1
        if self.error:
            raise RuntimeError(self.error)


class Host:
    """A fake host in tmp_path and its ha_config.json."""

    def __init__(self, tmp_path, monkeypatch):
        self.dir = tmp_path
        self.zfs_state = tmp_path / "zfs.json"
        self.zfs_script = tmp_path / "zfs.py"
        self.zfs_script.write_text(FAKE_ZFS)
        self.set_datasets({ds: {"mounted": "yes", "keystatus": k}
                           for ds, k in zip(DATASETS, ("available", "-"))})
        self.hoster = tmp_path / "hoster"
        self.hoster.mkdir()
        self.init = tmp_path / "hoster_init"
        self.init.write_text("")
        self.vmm = tmp_path / "vmm"
        self.vmm.mkdir()
        self.run_dir = tmp_path / "run"
        self.run_dir.mkdir()
        self.secret = tmp_path / "secret"
        self.secret.write_text(SECRET + "\n")
        os.chmod(self.secret, 0o600)
        self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.syslog_path = str(tmp_path / "log")
        self.syslog.bind(self.syslog_path)
        monkeypatch.setattr(hoster_ha, "SYSLOG_SOCKETS", (str(tmp_path / "nolog"),
                                                          self.syslog_path))
        self.port = free_port()
        self.config = str(tmp_path / "ha_config.json")
        self.data = {
            "hostname": "node1", "secret_file": str(self.secret),
            "candidates": [{"hostname": f"node{i}", "address": f"127.0.0.{i}",
                            "port": self.port} for i in (1, 2, 3)],
            "listen_address": "127.0.0.1", "run_dir": str(self.run_dir),
            "state_dir": str(tmp_path / "state"), "vmm_dir": str(self.vmm),
            "hoster_config_dir": str(self.hoster), "hoster_init_file": str(self.init),
            "commands": {"zfs": [sys.executable, str(self.zfs_script), str(self.zfs_state)],
                         "hostname": ["echo", "node1"]},
        }
        self.write()

    def set_datasets(self, state):
        self.zfs_state.write_text(json.dumps(state))

    def write(self, **over):
        data = dict(self.data, **over)
        with open(self.config, "w") as f:
            json.dump(data, f)
        return self.config

    def close(self):
        self.syslog.close()


@pytest.fixture
def host(tmp_path, monkeypatch):
    h = Host(tmp_path, monkeypatch)
    yield h
    h.close()


def run_doctor(host, kernel=None, offset=None):
    kw = {}
    if kernel is not None:
        kw["make_kernel"] = lambda cfg: kernel
    if offset is not None:
        kw["offset"] = offset
    checks = hoster_ha.doctor(host.config, **kw)
    for c in checks:  # every line is one line, marked, and a failure says what to do
        line = c.line()
        assert "\n" not in line and line[:2] in ("✓ ", "✗ ", "– "), line
        if c.ok is False:
            assert c.fix or "kernel_watchdog" in c.detail, line
    return checks


def by_name(checks):
    return {c.name: c for c in checks}


def failed(checks):
    return [c for c in checks if c.ok is False]


# -- a healthy host ---------------------------------------------------------------------------

def test_a_healthy_host_passes_every_check(host):
    checks = run_doctor(host)
    assert failed(checks) == [], [c.line() for c in failed(checks)]
    names = [c.name for c in checks]
    assert names == ["python", "config", "secret", "hostname", "Hoster initialised",
                     "VM datasets", "dataset zroot/vm-encrypted", "dataset zroot/vm-unencrypted",
                     "port", "Hoster's HA", "syslog", "kernel watchdog", "clock offset"], names
    c = by_name(checks)
    assert c["dataset zroot/vm-encrypted"].detail == "mounted, key loaded"
    assert c["dataset zroot/vm-unencrypted"].detail == "mounted, not encrypted"
    assert c["VM datasets"].detail.startswith("zroot/vm-encrypted, zroot/vm-unencrypted "
                                              "(defaults: no Hoster host_config.json in ")
    assert c["kernel watchdog"].ok is None and "off" in c["kernel watchdog"].detail
    assert c["clock offset"].ok is None and "agent is not running" in c["clock offset"].detail
    assert c["syslog"].detail == f"{host.syslog_path} accepts messages"


def test_cli_exit_status_and_json(host, capsys):
    assert hoster_ha.main(["doctor", "--config", host.config]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "all checks passed" and out[0].startswith("✓ python: "), out
    assert hoster_ha.main(["doctor", "--config", host.config, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is True
    assert {"check", "ok", "detail", "fix"} <= set(answer["checks"][0])
    host.init.unlink()
    assert hoster_ha.main(["doctor", "--config", host.config, "--json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is False
    bad = [c for c in answer["checks"] if c["ok"] is False]
    assert [c["check"] for c in bad] == ["Hoster initialised"], bad
    assert hoster_ha.main(["doctor", "--config", host.config]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "1 check failed", out


def test_cli_subprocess_runs_even_with_a_broken_config(tmp_path):
    path = tmp_path / "ha_config.json"
    path.write_text('{"bogus": 1}')
    r = subprocess.run([sys.executable, AGENT, "doctor", "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("✗ config: ") and "bogus" in ln and "fix:" in ln for ln in lines), lines
    assert any(ln.startswith("– the other checks: skipped") for ln in lines), lines


# -- each failure, with its fix -----------------------------------------------------------------

def one_failure(checks, name):
    bad = failed(checks)
    assert [c.name for c in bad] == [name], [c.line() for c in bad]
    return bad[0]


def test_locked_dataset(host):
    host.set_datasets({DATASETS[0]: {"mounted": "no", "keystatus": "unavailable"},
                       DATASETS[1]: {"mounted": "yes", "keystatus": "-"}})
    c = one_failure(run_doctor(host), "dataset zroot/vm-encrypted")
    assert "locked" in c.detail and "zfs mount -a -l" in c.fix and "hoster init" in c.fix


def test_unmounted_dataset(host):
    host.set_datasets({DATASETS[0]: {"mounted": "yes", "keystatus": "available"},
                       DATASETS[1]: {"mounted": "no", "keystatus": "-"}})
    c = one_failure(run_doctor(host), "dataset zroot/vm-unencrypted")
    assert "not mounted" in c.detail and "zfs mount -a -l" in c.fix


def test_missing_dataset(host):
    host.set_datasets({DATASETS[0]: {"mounted": "yes", "keystatus": "available"}})
    c = one_failure(run_doctor(host), "dataset zroot/vm-unencrypted")
    assert "dataset does not exist" in c.detail


def test_datasets_from_hosters_host_config(host):
    (host.hoster / "host_config.json").write_text(json.dumps({"active_datasets": ["tank/vms"]}))
    host.set_datasets({"tank/vms": {"mounted": "yes", "keystatus": "-"}})
    c = by_name(run_doctor(host))
    assert "dataset tank/vms" in c and c["dataset tank/vms"].ok is True
    assert "Hoster's active_datasets in" in c["VM datasets"].detail
    assert "dataset zroot/vm-encrypted" not in c


@pytest.mark.parametrize("missing", ["init", "vmm"])
def test_hoster_not_initialised(host, missing):
    path = host.init if missing == "init" else host.vmm
    if missing == "init":
        path.unlink()
    else:
        path.rmdir()
    c = one_failure(run_doctor(host), "Hoster initialised")
    assert str(path) in c.detail and "hoster init" in c.fix


def test_hostname_not_the_kernels(host):
    host.write(commands=dict(host.data["commands"], hostname=["echo", "hoster-9"]))
    c = one_failure(run_doctor(host), "hostname")
    assert "'hoster-9'" in c.detail and "'node1'" in c.detail


def test_port_taken(host):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", host.port))
    s.listen(1)
    try:
        c = one_failure(run_doctor(host), "port")
    finally:
        s.close()
    assert f"port {host.port} is taken" in c.detail and "sockstat" in c.fix


def test_port_held_by_our_own_agent_is_fine(host):
    (host.run_dir / "hoster_ha.pid").write_text(f"{os.getpid()}\n")  # "the agent runs"
    c = by_name(run_doctor(host, offset=lambda cfg, cand: (0.1, None)))
    assert c["port"].ok is True and f"in use by this agent (PID {os.getpid()})" in \
        c["port"].detail


def test_hosters_ha_on(host):
    (host.hoster / "restapi_config.json").write_text(json.dumps({"port": 3000,
                                                                 "ha_mode": True}))
    c = one_failure(run_doctor(host), "Hoster's HA")
    assert "ha_mode" in c.detail and "ha_mode" in c.fix


def test_no_syslog(host, monkeypatch):
    monkeypatch.setattr(hoster_ha, "SYSLOG_SOCKETS", (str(host.dir / "nolog"),))
    c = one_failure(run_doctor(host), "syslog")
    assert "syslogd" in c.fix


def test_secret_file_readable_by_others(host):
    os.chmod(host.secret, 0o644)
    checks = run_doctor(host)
    c = by_name(checks)
    assert c["secret"].ok is False and "chmod 600" in c["secret"].fix
    assert c["config"].ok is False  # the config refuses it as well


def test_inline_secret_in_a_world_readable_config(host):
    data = dict(host.data, secret=SECRET)
    del data["secret_file"]
    with open(host.config, "w") as f:
        json.dump(data, f)
    os.chmod(host.config, 0o644)
    c = one_failure(run_doctor(host), "secret")
    assert "inline" in c.detail or "written in" in c.detail
    assert f"chmod 600 {host.config}" in c.fix
    os.chmod(host.config, 0o600)
    assert failed(run_doctor(host)) == []


def test_python_missing(host, monkeypatch, tmp_path):
    script = tmp_path / "hoster_ha.py"
    script.write_text("#!/nonexistent/bin/python3\n")
    monkeypatch.setattr(hoster_ha, "__file__", str(script))
    c = one_failure(run_doctor(host), "python")
    assert "/nonexistent/bin/python3" in c.detail and "pkg install python3" in c.fix


# -- the kernel watchdog: only when kernel_watchdog is on, never the real device ------------------

def test_kernel_watchdog_probe_ok(host):
    host.write(kernel_watchdog=True, failover_time=60)
    k = FakeKernel()
    c = by_name(run_doctor(host, kernel=k))["kernel watchdog"]
    assert c.ok is True and k.checked == 1 and "/fake/fido works" in c.detail


def test_kernel_watchdog_without_driver(host):
    host.write(kernel_watchdog=True)
    k = FakeKernel("kernel_watchdog is on but watchdog(4) has no driver on this host")
    c = one_failure(run_doctor(host, kernel=k), "kernel watchdog")
    assert "no driver" in c.detail


def test_kernel_watchdog_in_use_by_our_watchdog_is_not_probed(host):
    """Probing would disarm the device our running ha_watchdog armed."""
    host.write(kernel_watchdog=True)
    (host.run_dir / "ha_watchdog.pid").write_text(f"{os.getpid()}\n")
    k = FakeKernel("must not be called")
    c = by_name(run_doctor(host, kernel=k))["kernel watchdog"]
    assert c.ok is True and "not probed" in c.detail and k.checked == 0


# -- clocks ---------------------------------------------------------------------------------------

def agent_running(host):
    (host.run_dir / "hoster_ha.pid").write_text(f"{os.getpid()}\n")


def test_clock_offsets_to_the_other_candidates(host):
    agent_running(host)
    asked = []

    def offset(cfg, cand):
        asked.append(cand["hostname"])
        return {"node2": 0.4, "node3": -25.0}[cand["hostname"]], None
    checks = run_doctor(host, offset=offset)
    assert asked == ["node2", "node3"]  # not ourselves
    c = by_name(checks)
    assert c["clock offset to node2"].ok is True and c["clock offset to node2"].detail \
        .startswith("+0.4 s")
    bad = one_failure(checks, "clock offset to node3")
    assert bad.detail.startswith("-25.0 s") and "ntpd" in bad.fix


def test_clock_candidate_not_answering(host):
    agent_running(host)
    checks = run_doctor(host, offset=lambda cfg, cand: (None, "ConnectionRefusedError"))
    assert [c.name for c in failed(checks)] == ["clock offset to node2", "clock offset to node3"]


def test_clock_offset_from_real_agents(tmp_path):
    """Three debug-mode candidates on loopback; doctor on node1 reads the Date of each other
    candidate's signed answer."""
    c = LocalCluster(str(tmp_path / "c"), debug=True)
    try:
        c.start_all()
        cfg1 = hoster_ha.load_config(c["node1"].config)

        def up():
            return all(hoster_ha.clock_offset(cfg1, cand)[1] is None for cand in cfg1.candidates)
        assert c.wait_for(up, 20, 0.2), c["node2"].log()[-2000:]
        r = subprocess.run([sys.executable, AGENT, "doctor", "--json", "--config",
                            c["node1"].config], capture_output=True, text=True, timeout=60)
        checks = {x["check"]: x for x in json.loads(r.stdout)["checks"]}
        for n in ("node2", "node3"):
            x = checks[f"clock offset to {n}"]
            assert x["ok"] is True, x
            assert abs(float(x["detail"].split()[0])) <= 1.5, x
        assert "clock offset to node1" not in checks
        # the agent said at start where its VM datasets come from (issue 11, item 6)
        assert f"NOTICE: VM datasets: zroot/vm-encrypted (vm_datasets in {c['node1'].config})" \
            in c["node1"].log(), c["node1"].log()[:2000]
        # a peer signing with another secret is not trusted
        cfg1.secret = "another secret of 16+ chars"
        off, error = hoster_ha.clock_offset(cfg1, cfg1.candidate("node2"))
        assert off is None and "not signed" in error
    finally:
        gone, left = c.teardown()
        assert gone and not left, left
