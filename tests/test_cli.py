"""CLI tests (SPEC §2, §4.1, §4.2): subprocess runs of `python3 hoster_ha.py ...`.

Bad config files must exit 2 with exactly one line on stderr naming the file and the key,
never a Python traceback.  No agent is started here: run_dir and state_dir point into
tmp_path, and every command that would talk to an agent finds none.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import hoster_ha

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AGENT = os.path.join(ROOT, "hoster_ha.py")
SECRET = "0123456789abcdef0123456789abcdef"
COMMANDS = ("start", "stop", "status", "members", "events", "check-config", "doctor",
            "gen-secret")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def good_config(tmp_path, **over):
    cfg = {
        "hostname": "node1",
        "secret": SECRET,
        "candidates": [{"hostname": f"node{i}", "protocol": "http", "address": f"127.0.0.{i}",
                        "port": PORT} for i in (1, 2, 3)],
        "listen_address": "127.0.0.1",
        "run_dir": str(tmp_path / "run"),
        "state_dir": str(tmp_path / "state"),
        "ping_interval": 0.5, "ping_timeout": 0.4, "survival_window": 2.5, "vote_lease": 1.5,
        "watchdog_timeout": 2, "fence_timeout": 2, "failover_time": 13,
        "hoster_config_dir": str(tmp_path / "hoster"),  # never this machine's Hoster files
    }
    cfg.update(over)
    # the kernel's hostname, as the host-command layer reports it: the node's own
    cfg.setdefault("commands", {}).setdefault("hostname", ["echo", cfg["hostname"]])
    return cfg


PORT = free_port()


def write(tmp_path, data, name="ha_config.json"):
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data, indent=2))
    return str(path)


def run(*args, env_config=None, timeout=30):
    env = {k: v for k, v in os.environ.items() if k != "HOSTER_HA_CONFIG"}
    if env_config is not None:
        env["HOSTER_HA_CONFIG"] = env_config
    return subprocess.run([sys.executable, AGENT, *args], capture_output=True, timeout=timeout,
                          env=env, encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL)


def assert_config_error(r, path, key=None, *more):
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), r.stderr
    assert path in lines[0], (path, lines[0])
    if key is not None:
        assert key in lines[0], (key, lines[0])
    for word in more:
        assert word in lines[0], (word, lines[0])
    assert r.stdout == "", r.stdout


# -- bad config files ----------------------------------------------------------------------

def _drop(key):
    def f(cfg):
        del cfg[key]
    return f


def _set(**kv):
    def f(cfg):
        cfg.update(kv)
    return f


def _cand(i, **kv):
    def f(cfg):
        cfg["candidates"][i].update(kv)
    return f


def _cands(n):
    def f(cfg):
        base = cfg["candidates"][0]
        cfg["candidates"] = [dict(base, hostname=f"node{i}", address=f"127.0.0.{i}")
                             for i in range(1, n + 1)]
    return f


def _secret_file(tmp_path, content, mode):
    p = tmp_path / "secret"
    p.write_text(content)
    os.chmod(p, mode)
    return str(p)


# name -> (mutation of a good config, or raw file content; key the message must name)
BAD = {
    "unknown key": (_set(bogus_key=1), "bogus_key"),
    "unknown candidate key": (_cand(0, colour="red"), "colour"),
    "2 candidates": (_cands(2), "candidates"),
    "4 candidates": (_cands(4), "candidates"),
    "candidates not a list": (_set(candidates={"node1": {}}), "candidates"),
    "duplicate hostnames": (_cand(2, hostname="node1"), "candidates"),
    "candidate without address": (lambda c: c["candidates"][1].pop("address"), "address"),
    "candidate bad port": (_cand(1, port="http"), "port"),
    "candidate bad protocol": (_cand(0, protocol="ftp"), "protocol"),
    "candidate bad hostname": (_cand(0, hostname="bad host"), "hostname"),
    "missing secret": (_drop("secret"), "secret"),
    "short secret": (_set(secret="short"), "secret"),
    "secret not a string": (_set(secret=1234567890123456789), "secret"),
    "timing rule violated": (_set(failover_time=10), "failover_time"),
    "ping_timeout >= ping_interval": (_set(ping_timeout=0.5), "ping_timeout"),
    "negative timing": (_set(vote_lease=-1), "vote_lease"),
    "timing as string": (_set(ping_interval="2"), "ping_interval"),
    "timing as bool": (_set(fence_timeout=True), "fence_timeout"),
    "timing NaN": ("NaN:survival_window", "survival_window"),
    "timing Infinity": ("Infinity:watchdog_timeout", "watchdog_timeout"),
    "worker without address": (_set(hostname="worker1"), "address"),
    "bad hostname": (_set(hostname="bad host;rm"), "hostname"),
    "unknown command": (_set(commands={"format_disk": ["true"]}), "format_disk"),
    "command not a list": (_set(commands={"reboot": "shutdown -r now"}), "reboot"),
    "bad failover_strategy": (_set(failover_strategy="teleport"), "failover_strategy"),
    "backup_node not bool": (_set(backup_node="yes"), "backup_node"),
    "https without tls": (_cand(0, protocol="https"), "tls"),
    "vm_datasets not a list": (_set(vm_datasets="zroot/vm"), "vm_datasets"),
    "max_parallel_starts 0": (_set(max_parallel_starts=0), "max_parallel_starts"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_with_one_line_naming_file_and_key(tmp_path, case):
    change, key = BAD[case]
    cfg = good_config(tmp_path)
    if isinstance(change, str):  # a non-finite number, which json.dumps writes as NaN/Infinity
        value, k = change.split(":")
        cfg[k] = float(value.lower().replace("infinity", "inf"))
    else:
        change(cfg)
    path = write(tmp_path, cfg)
    r = run("check-config", "--config", path)
    assert_config_error(r, path, key)


def test_timing_rule_message_names_the_keys_and_the_numbers(tmp_path):
    cfg = good_config(tmp_path, failover_time=10, survival_window=2.5, watchdog_timeout=2,
                      fence_timeout=2, ping_interval=0.5)
    path = write(tmp_path, cfg)
    r = run("check-config", "--config", path)
    assert_config_error(r, path, "failover_time", "survival_window", "watchdog_timeout",
                        "fence_timeout", "ping_interval", "10", "2.5", "12.5")


def test_secret_file_problems(tmp_path):
    cfg = good_config(tmp_path)
    del cfg["secret"]
    cfg["secret_file"] = str(tmp_path / "no-such-secret")       # missing
    path = write(tmp_path, cfg)
    assert_config_error(run("check-config", "--config", path), path, "secret_file")
    cfg["secret_file"] = _secret_file(tmp_path, SECRET + "\n", 0o644)  # group/other readable
    path = write(tmp_path, cfg)
    assert_config_error(run("check-config", "--config", path), path, "secret_file")
    cfg["secret_file"] = _secret_file(tmp_path, SECRET + "\n", 0o600)
    cfg["secret"] = SECRET                                        # both set
    path = write(tmp_path, cfg)
    assert_config_error(run("check-config", "--config", path), path, "secret")


RAW_BAD = {
    "not JSON": "{not json",
    "truncated JSON": '{"hostname": "node1", ',
    "not UTF-8": b"\xff\xfe{}",
    "empty file": "",
    "top level a list": "[1, 2, 3]",
    "deeply nested": "[" * 100000,
}


@pytest.mark.parametrize("case", sorted(RAW_BAD))
def test_unparsable_config_exits_2_with_one_line_naming_the_file(tmp_path, case):
    path = write(tmp_path, RAW_BAD[case])
    r = run("check-config", "--config", path)
    assert_config_error(r, path)


def test_missing_or_unreadable_config_file(tmp_path):
    missing = str(tmp_path / "nope" / "ha_config.json")
    assert_config_error(run("check-config", "--config", missing), missing)
    folder = str(tmp_path)
    assert_config_error(run("check-config", "--config", folder), folder)


@pytest.mark.parametrize("command", ["start", "stop", "status", "members", "events"])
def test_every_command_refuses_a_bad_config_the_same_way(tmp_path, command):
    path = write(tmp_path, good_config(tmp_path, bogus_key=1))
    r = run(command, "--config", path)
    assert_config_error(r, path, "bogus_key")
    assert not os.path.exists(tmp_path / "run" / "hoster_ha.pid")


# -- good configs --------------------------------------------------------------------------

def test_check_config_ok(tmp_path):
    path = write(tmp_path, good_config(tmp_path))
    r = run("check-config", "--config", path)
    assert r.returncode == 0, r
    assert path in r.stdout and "OK" in r.stdout
    assert r.stderr == ""


def test_check_config_accepts_hosters_existing_file_plus_a_secret_file(tmp_path):
    """§4.2: user/password in candidates are ignored; port may be a string; secret_file's
    trailing newline is not part of the secret."""
    cfg = good_config(tmp_path)
    del cfg["secret"]
    cfg["secret_file"] = _secret_file(tmp_path, SECRET + "\n", 0o600)
    for c in cfg["candidates"]:
        c.update(port=str(PORT), user="admin", password="unused")
    cfg.update(failover_strategy="change-parent", backup_node=False)
    path = write(tmp_path, cfg)
    r = run("check-config", "--config", path)
    assert r.returncode == 0, r
    assert "OK" in r.stdout


def test_check_config_worker(tmp_path):
    path = write(tmp_path, good_config(tmp_path, hostname="worker1", address="127.0.0.4",
                                       port=PORT))
    r = run("check-config", "--config", path)
    assert r.returncode == 0, r
    assert "worker" in r.stdout


def test_hoster_ha_config_env_is_honoured(tmp_path):
    good = write(tmp_path, good_config(tmp_path), "good.json")
    bad = write(tmp_path, good_config(tmp_path, bogus_key=1), "bad.json")
    r = run("check-config", env_config=good)
    assert r.returncode == 0 and good in r.stdout, r
    r = run("check-config", env_config=bad)
    assert_config_error(r, bad, "bogus_key")
    r = run("status", env_config=bad)
    assert_config_error(r, bad, "bogus_key")
    # --config wins over the environment
    r = run("check-config", "--config", good, env_config=bad)
    assert r.returncode == 0 and good in r.stdout, r
    # status without --config reads the env's config (its run_dir: nothing runs there)
    r = run("status", "--json", env_config=good)
    assert r.returncode == 1, r
    assert json.loads(r.stdout)["hostname"] == "node1"


# -- commands without a running agent ------------------------------------------------------

def test_status_when_not_running(tmp_path):
    path = write(tmp_path, good_config(tmp_path))
    r = run("status", "--config", path)
    assert r.returncode == 1, r
    assert r.stdout.splitlines() == ["🔴 API Server IS NOT running",
                                     "🔴 HA Watchdog service IS NOT running"], r.stdout
    assert "Traceback" not in r.stderr
    r = run("status", "--json", "--config", path)
    assert r.returncode == 1, r
    st = json.loads(r.stdout)
    for k in ("hostname", "role", "manager", "term", "reachable_candidates", "armed",
              "maintenance", "mode", "api_pid", "watchdog_pid"):
        assert k in st, k
    assert st["api_pid"] is None and st["watchdog_pid"] is None
    assert st["hostname"] == "node1" and st["role"] == "candidate"


def test_status_with_stale_pid_files(tmp_path):
    """pid files left by a crash, naming a process that is gone: not running."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "hoster_ha.pid").write_text(dead + "\n")
    (run_dir / "ha_watchdog.pid").write_text(dead + "\n")
    (run_dir / "hoster_ha.mode").write_text("DEBUG\n")
    path = write(tmp_path, good_config(tmp_path))
    r = run("status", "--config", path)
    assert r.returncode == 1, r
    assert r.stdout.splitlines() == ["🔴 API Server IS NOT running",
                                     "🔴 HA Watchdog service IS NOT running"], r.stdout
    r = run("stop", "--config", path)
    assert r.returncode == 0 and "not running" in r.stdout, r


def test_stop_when_not_running(tmp_path):
    path = write(tmp_path, good_config(tmp_path))
    r = run("stop", "--config", path)
    assert r.returncode == 0, r
    assert "not running" in r.stdout
    assert "Traceback" not in r.stderr


def test_members_and_events_without_an_agent(tmp_path):
    path = write(tmp_path, good_config(tmp_path))
    r = run("members", "--config", path)
    assert r.returncode == 1, r
    assert r.stderr.strip() and "Traceback" not in r.stderr
    r = run("events", "--json", "--config", path)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r
    r = run("events", "--config", path)
    assert r.returncode == 0 and r.stdout == "", r


# -- gen-secret, help, usage ---------------------------------------------------------------

def test_gen_secret(tmp_path):
    r1 = run("gen-secret", env_config=str(tmp_path / "no-such-config.json"))
    r2 = run("gen-secret")
    for r in (r1, r2):
        assert r.returncode == 0, r
        assert re.fullmatch(r"[0-9a-f]{64}\n", r.stdout), r.stdout
        assert r.stderr == ""
    assert r1.stdout != r2.stdout


def test_help_lists_the_commands():
    r = run("--help")
    assert r.returncode == 0, r
    for c in COMMANDS:
        assert re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", r.stdout), (c, r.stdout)
    r = run("start", "--help")
    assert r.returncode == 0
    for opt in ("--config", "--ha-debug", "--foreground"):
        assert opt in r.stdout, opt
    for c in ("status", "members", "events"):
        r = run(c, "--help")
        assert r.returncode == 0 and "--json" in r.stdout and "--config" in r.stdout, c


@pytest.mark.parametrize("args", [(), ("frobnicate",), ("status", "--no-such-flag")],
                         ids=["no-command", "unknown-command", "unknown-flag"])
def test_usage_errors_exit_2(args):
    r = run(*args)
    assert r.returncode == 2, r
    assert "usage" in r.stderr.lower()
    assert "Traceback" not in r.stderr


# -- the host checks start and check-config refuse on (issue 11, items 5 and 7) -------------

def assert_refused(r, *words):
    """Exit 2, one line on stderr holding every word, nothing on stdout, no traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == "", r.stdout


def test_production_start_refuses_a_hostname_that_is_not_the_kernels(tmp_path):
    """Hoster compares parent_host with kern.hostname: an agent called otherwise would
    lock, demote and start VMs under a name Hoster does not know."""
    path = write(tmp_path, good_config(tmp_path, commands={"hostname": ["echo", "hoster-7"]}))
    for args in (("check-config",), ("start", "--foreground"), ("start",)):
        r = run(*args, "--config", path)
        assert_refused(r, "'node1'", "'hoster-7'", "kernel's hostname", "parent_host")
    assert not os.path.exists(tmp_path / "run" / "hoster_ha.pid")


def test_a_hostname_command_that_fails_refuses_too(tmp_path):
    path = write(tmp_path, good_config(tmp_path, commands={
        "hostname": [sys.executable, "-c", "import sys; sys.exit('no kern.hostname here')"]}))
    r = run("check-config", "--config", path)
    assert_refused(r, "cannot read the kernel's hostname", "no kern.hostname here")


def test_debug_mode_only_warns_about_the_hostname(tmp_path):
    path = write(tmp_path, good_config(tmp_path, commands={"hostname": ["echo", "hoster-7"]}))
    r = run("check-config", "--ha-debug", "--config", path)
    assert r.returncode == 0, r
    assert "warning (debug mode)" in r.stderr and "'hoster-7'" in r.stderr, r.stderr
    assert "OK" in r.stdout


def hoster_files(tmp_path, **files):
    d = tmp_path / "hoster"
    d.mkdir(exist_ok=True)
    for name, content in files.items():
        (d / f"{name}.json").write_text(json.dumps(content))
    return d


def test_hosters_own_ha_enabled_is_refused(tmp_path):
    d = hoster_files(tmp_path, restapi_config={"bind": "0.0.0.0", "port": 3000,
                                               "ha_mode": True, "ha_debug": False})
    path = write(tmp_path, good_config(tmp_path))
    for args in (("check-config",), ("start", "--foreground")):
        r = run(*args, "--config", path)
        assert_refused(r, "Hoster's own HA is enabled", "ha_mode", str(d / "restapi_config.json"))
    assert not os.path.exists(tmp_path / "run" / "hoster_ha.pid")
    hoster_files(tmp_path, restapi_config={"port": 3000, "ha_mode": False})
    r = run("check-config", "--config", path)
    assert r.returncode == 0, r
    assert "✓ Hoster's HA: off" in r.stdout, r.stdout


def test_a_taken_port_is_refused_naming_it(tmp_path):
    port = free_port()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    try:
        cands = [{"hostname": f"node{i}", "address": f"127.0.0.{i}", "port": port}
                 for i in (1, 2, 3)]
        path = write(tmp_path, good_config(tmp_path, candidates=cands))
        for args in (("check-config",), ("start", "--foreground"), ("start",),
                     ("check-config", "--ha-debug")):
            r = run(*args, "--config", path)
            assert_refused(r, f"port {port} is taken", f"127.0.0.1:{port}")
    finally:
        s.close()
    r = run("check-config", "--config", path)
    assert r.returncode == 0, r
    assert f"✓ port: {port} is free on 127.0.0.1" in r.stdout, r.stdout


def test_check_config_says_where_the_vm_datasets_come_from(tmp_path):
    d = hoster_files(tmp_path, host_config={"active_datasets": ["tank/vm-a", "tank/vm-b"]})
    path = write(tmp_path, good_config(tmp_path))
    r = run("check-config", "--config", path)
    assert r.returncode == 0, r
    assert (f"VM datasets: tank/vm-a, tank/vm-b (Hoster's active_datasets in "
            f"{d / 'host_config.json'})") in r.stdout.splitlines(), r.stdout
    path = write(tmp_path, good_config(tmp_path, vm_datasets=["zroot/x"]))
    r = run("check-config", "--config", path)
    assert f"VM datasets: zroot/x (vm_datasets in {path})" in r.stdout.splitlines(), r.stdout


def test_check_config_accepts_hosters_ha_config_keys(tmp_path):
    cfg = good_config(tmp_path, node_type="candidate", startup_time=1700000000)
    for c in cfg["candidates"]:
        c.update(failover_strategy="cireset", failover_time=60, backup_node=False,
                 startup_time=0, registered=False, times_failed=0, user="u", password="p")
    r = run("check-config", "--config", write(tmp_path, cfg))
    assert r.returncode == 0, r


def test_example_config_does_not_use_hosters_rest_api_port(tmp_path):
    """Hoster's REST API listens on 3000; an agent on the same port cannot start beside it."""
    with open(os.path.join(ROOT, "ha_config.json.example")) as f:
        example = json.load(f)
    ports = {int(c["port"]) for c in example["candidates"]}
    assert 3000 not in ports, ports
    assert "port" not in example or int(example["port"]) != 3000
    # and it loads once its secret file exists (hostname pinned to a candidate)
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    os.chmod(secret, 0o600)
    example.update(secret_file=str(secret), hostname=example["candidates"][0]["hostname"],
                   hoster_config_dir=str(tmp_path))
    sys.path.insert(0, ROOT)
    import hoster_ha
    cfg = hoster_ha.load_config(write(tmp_path, example))
    assert cfg.port in ports


# -- install (issue 11, item 10) -------------------------------------------------------------

def test_installed_scripts_write_no_pycache(tmp_path):
    """ha_watchdog.py imports hoster_ha.py from its own folder (sbin when installed): that
    must not leave a __pycache__ there."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    for f in ("hoster_ha.py", "ha_watchdog.py"):
        (sbin / f).write_bytes(open(os.path.join(ROOT, f), "rb").read())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for argv in (["ha_watchdog.py", "--help"], ["hoster_ha.py", "--version"]):
        r = subprocess.run([sys.executable, str(sbin / argv[0]), *argv[1:]], env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r
    assert sorted(os.listdir(sbin)) == ["ha_watchdog.py", "hoster_ha.py"], os.listdir(sbin)


@pytest.mark.parametrize("make", ["make", "bmake"])
def test_make_install_warns_when_install_python_is_missing(tmp_path, make):
    import shutil
    if shutil.which(make) is None:
        pytest.skip(f"{make} is not installed")
    missing = str(tmp_path / "no" / "python3")
    r = subprocess.run([make, "-s", "install", f"DESTDIR={tmp_path / 'stage'}",
                        f"INSTALL_PYTHON={missing}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r
    assert "warning" in r.stderr and missing in r.stderr and "pkg install python3" in r.stderr, \
        r.stderr
    r = subprocess.run([make, "-s", "install", f"DESTDIR={tmp_path / 'stage2'}",
                        f"INSTALL_PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r
    assert "warning" not in r.stderr, r.stderr


# -- issue 14: events --since, the status view ----------------------------------------------

def test_events_since_filters_by_age_and_iso_time(tmp_path):
    path = write(tmp_path, good_config(tmp_path))
    state = tmp_path / "state"
    state.mkdir()
    now = time.time()
    evs = [{"ts": now - 7200, "node": "node1", "event": "armed"},
           {"ts": now - 600, "node": "node1", "event": "member_failed", "member": "w1",
            "silence": {"node1": 61.0, "node2": 60.5}},
           {"ts": now - 5, "node": "node1", "event": "vm_moved", "vm_name": "vm1"}]
    (state / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    r = run("events", "--since", "1h", "--json", "--config", path)
    assert r.returncode == 0, r
    assert [e["event"] for e in json.loads(r.stdout)] == ["member_failed", "vm_moved"]
    assert json.loads(r.stdout)[0]["silence"] == {"node1": 61.0, "node2": 60.5}
    r = run("events", "--since", "1m", "--config", path)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "vm_moved" in r.stdout, r
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 3600))
    r = run("events", "--since", iso, "--json", "--config", path)
    assert [e["event"] for e in json.loads(r.stdout)] == ["member_failed", "vm_moved"]
    r = run("events", "--since", "yesterday", "--config", path)
    assert r.returncode == 2 and "--since" in r.stderr and "Traceback" not in r.stderr, r


def test_status_details_candidate_and_worker():
    st = {"role": "manager", "manager": "node1", "manager_for_s": 750,
          "reachable_candidates": ["node1", "node2"], "survival_margin_s": 8.2,
          "approaching_fence": True, "vms_running": ["vm1"],
          "members": [{"hostname": "node1", "role": "manager", "state": "alive", "armed": True,
                       "maintenance": False, "last_seen_s": 0.4},
                      {"hostname": "w1", "role": "worker", "state": "failed", "armed": True,
                       "maintenance": False, "last_seen_s": 75}]}
    text = "\n".join(hoster_ha.status_details(st))
    assert "Quorum: yes (survival margin 8 s)" in text
    assert "one more lost candidate fences this node" in text
    assert "Manager since: 12 min ago" in text
    assert "VMs: 1 production VM(s) running here (vm1)" in text
    assert re.search(r"w1\s+worker\s+failed\s+yes\s+no\s+-\s+75 s ago", text), text
    # readiness, datasets and demotions (issue 11 items 2.1, 2.3)
    text = "\n".join(hoster_ha.status_details(dict(
        st, ready=False, not_ready=["dataset tank/enc unavailable: locked"],
        datasets_unavailable={"tank/enc": "locked"}, demotion_pending={"vm2": "node3"})))
    assert "Ready: NO (dataset tank/enc unavailable: locked)" in text
    assert "Datasets: tank/enc UNAVAILABLE (locked)" in text
    assert "Demotion pending: vm2 (moved to node3): waits for the dataset" in text
    worker = "\n".join(hoster_ha.status_details(
        {"role": "worker", "manager": "node1", "reachable_candidates": ["node1"],
         "members": None}))
    assert "Quorum: NO" in worker and "ask a candidate" in worker
