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

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AGENT = os.path.join(ROOT, "hoster_ha.py")
SECRET = "0123456789abcdef0123456789abcdef"
COMMANDS = ("start", "stop", "status", "members", "events", "check-config", "gen-secret")


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
    }
    cfg.update(over)
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
