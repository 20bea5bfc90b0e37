"""Config validation tests for hoster_ha.py (SPEC §2, §4.2).

Every error must be a ConfigError whose text is one line naming the file and the key.
"""

import json
import marshal
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest

import hoster_ha
from hoster_ha import ConfigError, kernel_watchdog_seconds, load_config, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECRET = "0123456789abcdef0123"
HOSTERS_FOLDERS = hoster_ha.HOSTER_CONFIG_DIRS  # before the fixture below replaces them

# Hoster's own ha_config.json, as shipped (user/password per candidate, ports as strings).
HOSTER_EXAMPLE = textwrap.dedent("""\
    {
        "candidates": [
            {
                "hostname": "hoster-test-0101",
                "protocol": "http",
                "address": "10.0.105.50",
                "port": "3000",
                "user": "admin",
                "password": "123456"
            },
            {
                "hostname": "hoster-test-0102",
                "protocol": "http",
                "address": "10.0.105.51",
                "port": "3000",
                "user": "admin",
                "password": "123456"
            },
            {
                "hostname": "hoster-test-0103",
                "protocol": "http",
                "address": "10.0.105.52",
                "port": "3000",
                "user": "admin",
                "password": "123456"
            }
        ],
        "failover_strategy": "cireset",
        "failover_time": 60,
        "backup_node": false
    }
    """)


@pytest.fixture(autouse=True)
def no_real_hoster_files(tmp_path_factory, monkeypatch):
    """Never read this machine's Hoster config files: Hoster's folders point to an empty one."""
    monkeypatch.setattr(hoster_ha, "HOSTER_CONFIG_DIRS",
                        (str(tmp_path_factory.mktemp("no-hoster")),))


def base(**over):
    data = {
        "candidates": [
            {"hostname": "a", "address": "10.0.0.1", "port": 3000},
            {"hostname": "b", "address": "10.0.0.2", "port": 3000},
            {"hostname": "c", "address": "10.0.0.3", "port": 3000},
        ],
        "hostname": "a",
        "secret": SECRET,
    }
    data.update(over)
    return data


def config_error(data, path="/etc/test/ha_config.json"):
    with pytest.raises(ConfigError) as ei:
        parse_config(data, path)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert path in msg, f"file not named: {msg!r}"
    return msg


def write_json(tmp_path, data, name="ha_config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


# -- Hoster's file -------------------------------------------------------------------

def test_hoster_example_file_loads_once_a_secret_is_added(tmp_path, monkeypatch):
    data = json.loads(HOSTER_EXAMPLE)
    data["secret"] = SECRET
    path = write_json(tmp_path, data)
    # no "hostname": it defaults to the system hostname, here one of the candidates
    monkeypatch.setattr(hoster_ha.socket, "gethostname", lambda: "hoster-test-0102")
    cfg = load_config(path)
    assert cfg.hostname == "hoster-test-0102"
    assert cfg.is_candidate
    assert cfg.candidate_names == ["hoster-test-0101", "hoster-test-0102", "hoster-test-0103"]
    for c in cfg.candidates:
        assert c["port"] == 3000 and isinstance(c["port"], int)
        assert c["protocol"] == "http"
        assert "user" not in c and "password" not in c
    assert cfg.address == "10.0.105.51"
    assert cfg.port == 3000
    assert cfg.failover_strategy == "cireset"
    assert cfg.failover_time == 60
    assert cfg.backup_node is False
    assert cfg.secret == SECRET
    assert cfg.path == path


def test_hoster_example_file_without_secret_names_the_secret_key(tmp_path, monkeypatch):
    path = tmp_path / "ha_config.json"
    path.write_text(HOSTER_EXAMPLE)
    monkeypatch.setattr(hoster_ha.socket, "gethostname", lambda: "hoster-test-0101")
    with pytest.raises(ConfigError) as ei:
        load_config(str(path))
    msg = str(ei.value)
    assert str(path) in msg and "'secret'" in msg and "\n" not in msg


def test_hoster_example_on_a_worker_needs_address_and_port(monkeypatch):
    data = json.loads(HOSTER_EXAMPLE)
    data["secret"] = SECRET
    monkeypatch.setattr(hoster_ha.socket, "gethostname", lambda: "hoster-worker-0201")
    msg = config_error(data)
    assert "'address'" in msg
    data.update(address="10.0.105.60", port="3000")
    cfg = parse_config(data, "<t>")
    assert not cfg.is_candidate
    assert (cfg.hostname, cfg.address, cfg.port, cfg.protocol) == \
        ("hoster-worker-0201", "10.0.105.60", 3000, "http")


# -- defaults -----------------------------------------------------------------------

def test_defaults():
    cfg = parse_config(base(), "<t>")
    assert cfg.ping_interval == 2
    assert cfg.ping_timeout == 1.5
    assert cfg.survival_window == 10
    assert cfg.vote_lease == 6
    assert cfg.watchdog_timeout == 10
    assert cfg.fence_timeout == 10
    assert cfg.failover_time == 60
    assert cfg.vm_datasets == ["zroot/vm-encrypted", "zroot/vm-unencrypted"]
    assert cfg.vmm_dir == "/dev/vmm"
    assert cfg.run_dir == "/var/run"
    assert cfg.state_dir == "/var/db/hoster_ha"
    assert cfg.listen_address == "0.0.0.0"
    assert cfg.failover_strategy == "change-parent"
    assert cfg.backup_node is False
    assert cfg.kernel_watchdog is False
    assert cfg.max_parallel_starts == 16
    assert cfg.start_timeout == 60 and cfg.start_confirm == 3
    assert cfg.log_file is None
    assert cfg.tls is None
    assert cfg.commands == {
        "vm_start": ["hoster", "vm", "start", "{vm}"],
        "vm_cireset": ["hoster", "vm", "cireset", "{vm}"],
        "vm_destroy": ["bhyvectl", "--destroy", "--vm={vm}"],
        "reboot": ["shutdown", "-r", "now"],
        "reboot_now": ["reboot", "-nq"],
        "vm_kill_supervisor": ["pkill", "-9", "-f", "/vm_supervisor_service for {vm}$"],
        "free_memory": ["sysctl", "-n", "vm.stats.vm.v_free_count", "hw.pagesize"],
        "zfs": ["zfs"],
        "hostname": ["sysctl", "-n", "kern.hostname"],
    }
    assert cfg.hoster_config_dir is None
    assert cfg.hoster_init_file == "/var/run/hoster_init"
    assert cfg.vm_datasets_source.startswith("defaults: no Hoster host_config.json in ")
    assert cfg.command("vm_destroy", "web1") == ["bhyvectl", "--destroy", "--vm=web1"]
    assert cfg.command("vm_start", "web1") == ["hoster", "vm", "start", "web1"]
    # a candidate's identity comes from its candidates entry
    assert (cfg.address, cfg.port, cfg.protocol) == ("10.0.0.1", 3000, "http")
    assert cfg.candidates[0]["protocol"] == "http"


def test_default_rule_holds_exactly():
    # 10 + 10 + 10 + 2*2 + 5 = 39 <= 60
    cfg = parse_config(base(failover_time=39), "<t>")
    assert cfg.failover_time == 39


def test_overrides_are_used():
    cfg = parse_config(base(
        ping_interval=0.5, ping_timeout=0.25, survival_window=2.5, vote_lease=1.5,
        watchdog_timeout=2, fence_timeout=2, failover_time=12.5,
        vm_datasets=["tank/vms"], vmm_dir="/tmp/vmm", run_dir="/tmp/run", state_dir="/tmp/st",
        listen_address="127.0.0.1", max_parallel_starts=2, log_file="/tmp/ha.log",
        commands={"reboot": ["/bin/echo", "reboot"], "zfs": ["/usr/local/bin/fakezfs"]},
        failover_strategy="ci-reset", backup_node=True,
    ), "<t>")
    assert cfg.ping_interval == 0.5 and cfg.failover_time == 12.5
    assert cfg.vm_datasets == ["tank/vms"]
    assert (cfg.vmm_dir, cfg.run_dir, cfg.state_dir) == ("/tmp/vmm", "/tmp/run", "/tmp/st")
    assert cfg.listen_address == "127.0.0.1"
    assert cfg.commands["reboot"] == ["/bin/echo", "reboot"]
    assert cfg.commands["zfs"] == ["/usr/local/bin/fakezfs"]
    assert cfg.commands["vm_start"] == ["hoster", "vm", "start", "{vm}"]
    assert cfg.failover_strategy == "cireset"
    assert cfg.backup_node is True
    assert cfg.max_parallel_starts == 2


@pytest.mark.parametrize("given,expected", [
    ("change-parent", "change-parent"), ("changeparent", "change-parent"),
    ("change_parent", "change-parent"), ("cireset", "cireset"), ("ci-reset", "cireset"),
])
def test_failover_strategy_aliases(given, expected):
    assert parse_config(base(failover_strategy=given), "<t>").failover_strategy == expected


def test_port_as_string_or_int():
    d = base()
    d["candidates"][1]["port"] = "3001"
    cfg = parse_config(d, "<t>")
    assert cfg.candidates[1]["port"] == 3001


# -- errors: unknown keys and types ------------------------------------------------------

def test_unknown_top_level_key():
    msg = config_error(base(ping_intervall=2))
    assert "ping_intervall" in msg


def test_unknown_key_in_candidates_entry():
    d = base()
    d["candidates"][2]["role"] = "manager"
    msg = config_error(d)
    assert "role" in msg and "candidates[2]" in msg


def test_unknown_key_in_commands_and_tls():
    assert "commands.shutdown" in config_error(base(commands={"shutdown": ["x"]}))
    assert "'tls'" in config_error(base(tls={"cert": "c", "key": "k", "ca": "a", "x": "y"}))


@pytest.mark.parametrize("key,value", [
    ("ping_interval", "2"),
    ("ping_timeout", None),
    ("survival_window", True),
    ("vote_lease", [6]),
    ("watchdog_timeout", {"s": 10}),
    ("fence_timeout", "ten"),
    ("failover_time", False),
    ("backup_node", "false"),
    ("backup_node", 0),
    ("kernel_watchdog", "yes"),
    ("failover_strategy", 1),
    ("listen_address", 0),
    ("vm_datasets", "zroot/vm"),
    ("vm_datasets", [1]),
    ("vmm_dir", ["/dev/vmm"]),
    ("run_dir", ""),
    ("state_dir", 5),
    ("commands", ["x"]),
    ("log_file", 3),
    ("max_parallel_starts", 2.5),
    ("max_parallel_starts", True),
    ("secret", 1234567890123456789),
    ("tls", "yes"),
    ("hostname", 5),
    ("hoster_config_dir", ""),
    ("hoster_config_dir", ["/opt/hoster-core/config_files"]),
    ("hoster_init_file", ""),
    ("hoster_init_file", 1),
])
def test_wrong_types(key, value):
    msg = config_error(base(**{key: value}))
    assert key in msg


@pytest.mark.parametrize("key,value", [
    ("reboot", "shutdown -r now"), ("reboot", []), ("vm_start", ["hoster", 1]),
    ("hostname", "hostname"), ("hostname", []),
])
def test_wrong_command_types(key, value):
    msg = config_error(base(commands={key: value}))
    assert f"commands.{key}" in msg


@pytest.mark.parametrize("field,value", [
    ("hostname", 5), ("hostname", "bad_name!"), ("hostname", ""),
    ("address", 10), ("address", ""),
    ("protocol", "ftp"), ("port", True), ("port", 3000.0),
])
def test_wrong_types_in_candidates(field, value):
    d = base()
    d["candidates"][1][field] = value
    msg = config_error(d)
    assert f"candidates[1].{field}" in msg


@pytest.mark.parametrize("field", ["hostname", "address", "port"])
def test_missing_field_in_candidates(field):
    d = base()
    del d["candidates"][0][field]
    msg = config_error(d)
    assert f"candidates[0].{field}" in msg


def test_not_an_object():
    assert "<cfg>" in config_error_path([1, 2], "<cfg>")


def config_error_path(data, path):
    with pytest.raises(ConfigError) as ei:
        parse_config(data, path)
    return str(ei.value)


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_not_exactly_three_candidates(n):
    d = base()
    d["candidates"] = [{"hostname": f"h{i}", "address": f"10.0.0.{i}", "port": 3000}
                       for i in range(n)]
    d["hostname"] = "h0" if n else "w"
    d.setdefault("address", "10.0.9.9")
    d.setdefault("port", 3000)
    msg = config_error(d)
    assert "'candidates'" in msg and str(n) in msg


def test_candidates_not_a_list():
    assert "'candidates'" in config_error(base(candidates={"a": {}}))
    d = base()
    del d["candidates"]
    assert "'candidates'" in config_error(d)
    d = base()
    d["candidates"][0] = "a"
    assert "candidates[0]" in config_error(d)


def test_duplicate_hostnames():
    d = base()
    d["candidates"][2]["hostname"] = "a"
    msg = config_error(d)
    assert "'candidates'" in msg and "duplicate" in msg and "'a'" in msg


def test_duplicate_endpoints():
    d = base()
    d["candidates"][2]["address"] = "10.0.0.1"
    assert "duplicate" in config_error(d)


# -- secret -----------------------------------------------------------------------------------

def test_missing_secret():
    d = base()
    del d["secret"]
    msg = config_error(d)
    assert "'secret'" in msg


def test_short_secret():
    assert "'secret'" in config_error(base(secret="x" * 15))
    assert parse_config(base(secret="x" * 16), "<t>").secret == "x" * 16


def test_secret_and_secret_file_together(tmp_path):
    sf = tmp_path / "secret"
    sf.write_text(SECRET)
    os.chmod(sf, 0o600)
    assert "secret" in config_error(base(secret_file=str(sf)))


def test_secret_file_mode_600_ok_and_trailing_newline_stripped(tmp_path):
    sf = tmp_path / "secret"
    sf.write_text(SECRET + "\n")
    os.chmod(sf, 0o600)
    d = base(secret_file=str(sf))
    del d["secret"]
    assert parse_config(d, "<t>").secret == SECRET
    sf.write_text(SECRET + "\r\n")
    assert parse_config(d, "<t>").secret == SECRET
    sf.write_text(SECRET)
    assert parse_config(d, "<t>").secret == SECRET
    os.chmod(sf, 0o400)
    assert parse_config(d, "<t>").secret == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o666])
def test_secret_file_readable_by_group_or_others(tmp_path, mode):
    sf = tmp_path / "secret"
    sf.write_text(SECRET + "\n")
    os.chmod(sf, mode)
    d = base(secret_file=str(sf))
    del d["secret"]
    msg = config_error(d)
    assert "'secret_file'" in msg and str(sf) in msg


def test_secret_file_missing_or_short(tmp_path):
    d = base(secret_file=str(tmp_path / "nope"))
    del d["secret"]
    assert "'secret_file'" in config_error(d)
    sf = tmp_path / "short"
    sf.write_text("abc\n")
    os.chmod(sf, 0o600)
    d["secret_file"] = str(sf)
    assert "secret" in config_error(d)


# -- the timing rule -----------------------------------------------------------------------------

def test_timing_rule_violated_names_keys_and_numbers():
    # need = 10 + 10 + 10 + 2*2 + 5 = 39
    msg = config_error(base(failover_time=38))
    for key in ("failover_time", "survival_window", "watchdog_timeout", "fence_timeout",
                "ping_interval"):
        assert key in msg, key
    assert "38" in msg and "39" in msg


def test_timing_rule_with_decimals():
    t = dict(ping_interval=0.5, ping_timeout=0.3, survival_window=1.5, vote_lease=1,
             watchdog_timeout=1.5, fence_timeout=1)
    # need = 1.5 + 1.5 + 1 + 1 + 5 = 10
    assert parse_config(base(failover_time=10, **t), "<t>").failover_time == 10
    assert parse_config(base(failover_time=10.0, **t), "<t>").failover_time == 10
    msg = config_error(base(failover_time=9.9, **t))
    assert "9.9" in msg and "10" in msg


def test_timing_rule_holding_exactly_in_decimal_is_accepted():
    """0.1 + (0.1 + 2.2) + 2*0.1 + 5 = 7.6 exactly, but the float sum is 7.6000000000000005:
    a config that satisfies the §2 rule must not be refused (with a message that reads
    '7.6 is too small: it must be >= ... = 7.6')."""
    t = dict(survival_window=0.1, watchdog_timeout=0.1, fence_timeout=2.2, ping_interval=0.1,
             ping_timeout=0.05, vote_lease=0.3)
    cfg = parse_config(base(failover_time=7.6, **t), "<t>")
    assert cfg.failover_time == 7.6


@pytest.mark.parametrize("key", ["ping_interval", "ping_timeout", "survival_window",
                                 "vote_lease", "watchdog_timeout", "fence_timeout",
                                 "failover_time"])
@pytest.mark.parametrize("value", [0, -1])
def test_timings_must_be_positive(key, value):
    assert key in config_error(base(**{key: value}))


def test_ping_timeout_must_be_below_ping_interval():
    msg = config_error(base(ping_timeout=2))
    assert "ping_timeout" in msg and "ping_interval" in msg
    msg = config_error(base(ping_timeout=2.5))
    assert "ping_timeout" in msg
    assert parse_config(base(ping_timeout=1.99), "<t>").ping_timeout == 1.99


@pytest.mark.parametrize("text", ['{"failover_time": NaN}', '{"failover_time": Infinity}',
                                  '{"ping_timeout": NaN}', '{"watchdog_timeout": NaN}',
                                  '{"vote_lease": Infinity}', '{"survival_window": NaN}'])
def test_non_finite_timings_are_refused(tmp_path, text):
    """Python's json accepts NaN/Infinity; with NaN every comparison is false, so the §2
    safety rule and ping_timeout < ping_interval pass unchecked."""
    extra = json.loads(text)
    key = next(iter(extra))
    data = json.dumps(base(**extra))          # json.dumps writes NaN / Infinity back
    p = tmp_path / "ha_config.json"
    p.write_text(data)
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert key in str(ei.value) and str(p) in str(ei.value)


# -- kernel watchdog -------------------------------------------------------------------------------

def test_kernel_watchdog_seconds():
    assert kernel_watchdog_seconds(10) == (34, 2 ** 34 / 1e9)       # 15 s -> 17.18 s
    assert kernel_watchdog_seconds(1) == (33, 2 ** 33 / 1e9)        # 6 s -> 8.59 s
    assert kernel_watchdog_seconds(30) == (36, 2 ** 36 / 1e9)       # 35 s -> 68.7 s
    # watchdog(8) -t takes whole seconds: wd + 5 is rounded up first
    assert kernel_watchdog_seconds(12)[0] == 34                     # 17 s <= 17.18 s
    assert kernel_watchdog_seconds(12.1)[0] == 35                   # 18 s > 17.18 s
    for wd in (0.5, 1, 3, 7.5, 10, 12, 29, 60):
        n, s = kernel_watchdog_seconds(wd)
        assert 2 ** n >= math.ceil(wd + 5) * 1e9 > 2 ** (n - 1)
        assert s == 2 ** n / 1e9


def test_kernel_watchdog_changes_the_rule():
    t = dict(ping_interval=1, ping_timeout=0.5, survival_window=1, vote_lease=1,
             watchdog_timeout=1, fence_timeout=1)
    # without: need = 1 + (1 + 1) + 2 + 5 = 10
    assert parse_config(base(failover_time=12, **t), "<t>").kernel_watchdog is False
    # with: kernel timeout 2**33 ns = 8.589934592 s > 2 -> need = 1 + 8.59 + 2 + 5 = 16.59
    msg = config_error(base(failover_time=12, kernel_watchdog=True, **t))
    assert "failover_time" in msg and "kernel watchdog" in msg and "8.5899" in msg
    cfg = parse_config(base(failover_time=16.6, kernel_watchdog=True, **t), "<t>")
    assert cfg.kernel_watchdog is True
    config_error(base(failover_time=16.58, kernel_watchdog=True, **t))


def test_kernel_watchdog_does_not_lower_the_rule():
    # defaults: kernel timeout 17.18 s < watchdog_timeout + fence_timeout = 20
    assert parse_config(base(failover_time=39, kernel_watchdog=True), "<t>").failover_time == 39
    assert "failover_time" in config_error(base(failover_time=38.9, kernel_watchdog=True))


def test_huge_watchdog_timeout_with_kernel_watchdog_fails_fast():
    """kernel_watchdog_seconds loops forever once (watchdog_timeout + 5) * 1e9 overflows to
    inf (watchdog_timeout >= ~1.8e299, or Infinity): check-config hangs instead of exit 2."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import hoster_ha
        data = {{"candidates": [{{"hostname": "a", "address": "10.0.0.1", "port": 1}},
                                {{"hostname": "b", "address": "10.0.0.2", "port": 1}},
                                {{"hostname": "c", "address": "10.0.0.3", "port": 1}}],
                 "hostname": "a", "secret": "x" * 16, "kernel_watchdog": True,
                 "watchdog_timeout": 1e300, "failover_time": 1e301}}
        try:
            hoster_ha.parse_config(data, "/x/ha_config.json")
        except hoster_ha.ConfigError as e:
            print("ConfigError", e)
        else:
            print("accepted")
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail("parse_config hangs on watchdog_timeout=1e300 with kernel_watchdog")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ConfigError"), r.stdout


# -- workers ---------------------------------------------------------------------------------------

def test_worker_needs_address_and_port():
    d = base(hostname="w1")
    msg = config_error(d)
    assert "'address'" in msg and "w1" in msg
    d["address"] = "10.0.0.9"
    msg = config_error(d)
    assert "'port'" in msg
    d["port"] = 3000
    cfg = parse_config(d, "<t>")
    assert not cfg.is_candidate
    assert (cfg.address, cfg.port, cfg.protocol) == ("10.0.0.9", 3000, "http")
    d["port"] = "3001"
    assert parse_config(d, "<t>").port == 3001


@pytest.mark.parametrize("address", ["", 5, None])
def test_worker_bad_address(address):
    assert "'address'" in config_error(base(hostname="w1", address=address, port=3000))


def test_candidate_may_override_its_listen_port():
    cfg = parse_config(base(port=4000), "<t>")
    assert cfg.port == 4000
    assert "'port'" in config_error(base(port=0))


@pytest.mark.parametrize("address", [5, "", ["10.0.0.1"]])
def test_candidate_address_override_is_type_checked(address):
    """On a worker "address" must be a non-empty string; on a candidate the override is
    taken unchecked (data.get("address", own["address"]))."""
    assert "'address'" in config_error(base(address=address))


# -- failover_strategy and ports ----------------------------------------------------------------

@pytest.mark.parametrize("value", ["restart", "CIRESET", "", "change parent"])
def test_bad_failover_strategy(value):
    assert "failover_strategy" in config_error(base(failover_strategy=value))


@pytest.mark.parametrize("value", [0, 65536, -1, "0", "65536", "30a0", "", " 3000", "-1",
                                   3000.5, None, True, [3000]])
def test_bad_port(value):
    d = base()
    d["candidates"][0]["port"] = value
    assert "candidates[0].port" in config_error(d)


@pytest.mark.parametrize("value", ["\u00b2", "\u0663\u0660\u0660\u0660", "\uff13\uff10"])
def test_port_with_non_ascii_digits_is_a_config_error(value):
    """str.isdigit() is true for '²' (int() then raises ValueError, not ConfigError) and for
    Arabic-Indic / full-width digits (silently accepted as a port)."""
    d = base()
    d["candidates"][0]["port"] = value
    assert "candidates[0].port" in config_error(d)


def test_bad_protocol_and_https_requires_tls():
    d = base()
    d["candidates"][0]["protocol"] = "HTTP"
    assert "candidates[0].protocol" in config_error(d)
    d["candidates"][0]["protocol"] = "https"
    assert "'tls'" in config_error(d)
    d["tls"] = {"cert": "/c.pem", "key": "/k.pem", "ca": "/ca.pem"}
    cfg = parse_config(d, "<t>")
    assert cfg.protocol == "https" and cfg.tls["ca"] == "/ca.pem"
    assert "'tls'" in config_error(base(tls={"cert": "/c.pem", "key": "/k.pem"}))


def test_bad_max_parallel_starts():
    assert "max_parallel_starts" in config_error(base(max_parallel_starts=0))
    # per target, and a candidate's address may hold 64 requests at a server
    assert "must be 1 to 64" in config_error(base(max_parallel_starts=65))
    assert hoster_ha.MAX_PARALLEL_STARTS <= hoster_ha.Server.PER_CANDIDATE


def test_external_fencing_keys():
    """Issue 13 item 5: off by default; fence_commands maps a member's hostname to an argv
    with an absolute program (only from this file: never announced over the network)."""
    cfg = parse_config(base(), "<t>")
    assert cfg.fence_commands == {}
    argv = ["/usr/local/sbin/bmc-off", "--host", "n1-bmc", "--password-file", "/root/bmc"]
    cfg = parse_config(base(fence_commands={"worker1": argv}), "<t>")
    assert cfg.fence_commands == {"worker1": argv}
    for bad in ([], "/usr/local/sbin/bmc-off", ["bmc-off"], ["/x", ""], ["/x", 3],
                ["/x"] * 33, ["/x", "a\0b"]):
        assert "'fence_commands.worker1'" in config_error(
            base(fence_commands={"worker1": bad})), bad
    assert "'fence_commands'" in config_error(base(fence_commands=[["/x"]]))
    assert "not a valid hostname" in config_error(base(fence_commands={"bad host": ["/x"]}))


def test_hostname_must_be_valid():
    assert "'hostname'" in config_error(base(hostname="not a host"))


def test_error_is_one_line_even_for_odd_key_names():
    msg = config_error(base(**{"ping\ninterval": 2}))
    assert "ping" in msg
    d = base()
    d["candidates"][0]["x\ny"] = 1
    config_error(d)


# -- load_config ------------------------------------------------------------------------------------

def test_load_config_not_json(tmp_path):
    p = tmp_path / "ha_config.json"
    p.write_text("{ this is not json")
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg


def test_load_config_not_utf8(tmp_path):
    p = tmp_path / "ha_config.json"
    p.write_bytes(b'{"secret": "\xff\xfe"}')
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert str(p) in str(ei.value)


def test_load_config_missing_file(tmp_path):
    p = tmp_path / "nope" / "ha_config.json"
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg


def test_load_config_top_level_not_object(tmp_path):
    p = tmp_path / "ha_config.json"
    p.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert str(p) in str(ei.value)


def test_load_config_ok_and_path_absolute(tmp_path, monkeypatch):
    path = write_json(tmp_path, base())
    monkeypatch.chdir(tmp_path)
    cfg = load_config("ha_config.json", debug=True)
    assert cfg.path == path
    assert cfg.debug is True
    assert cfg.hostname == "a"


def test_unknown_key_error_via_load_config_names_file(tmp_path):
    path = write_json(tmp_path, base(secrets=SECRET))
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert path in str(ei.value) and "secrets" in str(ei.value)


# -- Hoster's own files: ha_config.json keys, host_config.json datasets (issue 11, 6 and 7) ----

def test_hosters_own_ha_config_keys_are_accepted_and_ignored():
    """Hoster's ha_config.json may carry node_type and startup_time, and per candidate
    failover_strategy, failover_time, backup_node, startup_time, registered, times_failed
    (HosterCore rest_api_v2/pkg/config/get_ha_config.go): not fatal, and not used."""
    d = base(node_type="candidate", startup_time=1700000000)
    for c in d["candidates"]:
        c.update(failover_strategy="cireset", failover_time=5, backup_node=True,
                 startup_time=1700000000, registered=True, times_failed=3, user="admin",
                 password="x")
    cfg = parse_config(d, "<t>")
    assert cfg.failover_strategy == "change-parent" and cfg.failover_time == 60
    assert cfg.backup_node is False
    assert all(set(c) == {"hostname", "address", "port", "protocol"} for c in cfg.candidates)
    assert not hasattr(cfg, "node_type") and not hasattr(cfg, "startup_time")
    assert "unknown key" in config_error(base(node_kind="x"))  # any other key still fails


def hoster_dir(tmp_path, host_config=None, raw=None):
    d = tmp_path / "hoster"
    d.mkdir(exist_ok=True)
    if raw is not None:
        (d / "host_config.json").write_text(raw)
    elif host_config is not None:
        (d / "host_config.json").write_text(json.dumps(host_config))
    return str(d)


def test_vm_datasets_come_from_hosters_active_datasets(tmp_path):
    d = hoster_dir(tmp_path, {"public_vm_image_server": "https://images.yari.pw/",
                              "active_datasets": ["tank/vm-encrypted", "tank/vm-plain"]})
    cfg = parse_config(base(hoster_config_dir=d), "<t>")
    assert cfg.vm_datasets == ["tank/vm-encrypted", "tank/vm-plain"]
    assert cfg.vm_datasets_source == f"Hoster's active_datasets in {d}/host_config.json"
    assert cfg.vm_datasets_warn is False
    assert cfg.hoster_config_dir == d


def test_vm_datasets_in_the_config_win_over_hosters(tmp_path):
    d = hoster_dir(tmp_path, {"active_datasets": ["tank/vm"]})
    cfg = parse_config(base(hoster_config_dir=d, vm_datasets=["zroot/mine"]), "/x/ha.json")
    assert cfg.vm_datasets == ["zroot/mine"]
    assert cfg.vm_datasets_source == "vm_datasets in /x/ha.json"


@pytest.mark.parametrize("content", [
    '{"active_datasets": []}', '{"active_datasets": "tank/vm"}', '{"active_datasets": [1]}',
    '{"active_datasets": ["-o"]}', '{"tags": []}', "[]", "{broken",
])
def test_a_bad_host_config_falls_back_to_the_defaults_with_a_warning(tmp_path, content):
    d = hoster_dir(tmp_path, raw=content)
    cfg = parse_config(base(hoster_config_dir=d), "<t>")
    assert cfg.vm_datasets == ["zroot/vm-encrypted", "zroot/vm-unencrypted"]
    assert cfg.vm_datasets_source.startswith("defaults: ") and d in cfg.vm_datasets_source
    assert cfg.vm_datasets_warn is True


def test_no_host_config_falls_back_to_the_defaults_quietly(tmp_path):
    d = hoster_dir(tmp_path)
    cfg = parse_config(base(hoster_config_dir=d), "<t>")
    assert cfg.vm_datasets == ["zroot/vm-encrypted", "zroot/vm-unencrypted"]
    assert cfg.vm_datasets_source == f"defaults: no Hoster host_config.json in {d}"
    assert cfg.vm_datasets_warn is False


def test_without_hoster_config_dir_hosters_folders_are_searched_in_order(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "host_config.json").write_text(json.dumps({"active_datasets": ["b/vm"]}))
    monkeypatch.setattr(hoster_ha, "HOSTER_CONFIG_DIRS", (str(first), str(second)))
    assert parse_config(base(), "<t>").vm_datasets == ["b/vm"]
    (first / "host_config.json").write_text(json.dumps({"active_datasets": ["a/vm"]}))
    cfg = parse_config(base(), "<t>")
    assert cfg.vm_datasets == ["a/vm"] and str(first) in cfg.vm_datasets_source
    assert cfg.hoster_file("host_config.json") == str(first / "host_config.json")
    assert cfg.hoster_file("restapi_config.json") is None


def test_hoster_searches_the_folders_hoster_itself_uses():
    """HosterCore internal/pkg/hoster/locations/locations.go, GetConfigFolders()."""
    assert HOSTERS_FOLDERS == (
        "/opt/hoster-core/config_files", "/opt/hoster/config_files", "/usr/local/etc/hoster",
        "/etc/hoster", "/root/hoster/config_files")


def test_hostname_command_and_init_file_can_be_set():
    cfg = parse_config(base(commands={"hostname": ["/bin/echo", "a"]},
                            hoster_init_file="/tmp/x/hoster_init"), "<t>")
    assert cfg.command("hostname") == ["/bin/echo", "a"]
    assert cfg.hoster_init_file == "/tmp/x/hoster_init"


def test_compiled_self_writes_the_bytecode_once_and_again_when_the_file_changes(
        tmp_path, monkeypatch):
    """run_as_import's bytecode: written when missing, kept while it was compiled from
    the file as it is (its hash, whatever the mtime), written again when the file
    changes even within the same second and size; None when pycache/ or state_dir is
    writable by others, or cannot be written."""
    src = tmp_path / "hoster_ha.py"
    src.write_text("X = 1\n")
    monkeypatch.setattr(hoster_ha, "__file__", str(src))
    state = tmp_path / "state"
    script, pyc = hoster_ha.compiled_self(str(state))
    assert script == str(src) and os.path.dirname(pyc) == str(state / "pycache")
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"
    first = os.stat(pyc).st_mtime_ns
    time.sleep(0.01)
    assert hoster_ha.compiled_self(str(state)) == (script, pyc)
    assert os.stat(pyc).st_mtime_ns == first          # fresh: not rewritten
    st = os.stat(src)
    src.write_text("X = 2\n")                          # same size, same mtime
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hoster_ha.compiled_self(str(state)) == (script, pyc)
    ns = {}
    with open(pyc, "rb") as f:
        exec(marshal.loads(f.read()[16:]), ns)
    assert ns["X"] == 2
    os.chmod(state / "pycache", 0o777)
    assert hoster_ha.compiled_self(str(state)) is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert hoster_ha.compiled_self(str(blocked / "state")) is None
