#!/usr/bin/env python3
"""hoster_ha: high availability for FreeBSD bhyve hosts managed by Hoster.

One stdlib-only file.  Every host of the cluster runs it; three static hosts
(the *candidates*, listed in ha_config.json) keep the membership table and
elect a *manager* by majority-vote leases.  A host that can reach fewer than 2
candidates fences itself (destroys its VMs and reboots), so that the manager
may safely restart its production VMs elsewhere.

    hoster_ha.py start [--config PATH] [--ha-debug] [--foreground]
    hoster_ha.py stop | status [--json] | members [--json] | vms [--json] | events [--json]
    hoster_ha.py maintenance on|off | terminate | check-config [--config PATH] [--ha-debug]
    hoster_ha.py doctor [--config PATH] [--json] | gen-secret

The contract (behaviour, timings, CLI, config, HTTP API, files) is SPEC.md.
The file reads top to bottom:

    1. config       load and validate ha_config.json
    2. core         pure cluster logic: placement, then Core, a facade over named
                    parts sharing one outbox (Election, Membership, Link, Rejoin,
                    PlanBook, Detector, Protection, FailoverManager, FailoverTarget),
                    then the host-side rules (fence, demotion, running record)
    3. host         VM inventory, vm_config.json edits, fencing commands
    4. transport    request signing, HTTP server and client
    5. agent        threads and the control loop wiring core, host, transport
                    (Agent and its parts AgentAPI, AgentTarget, AgentHost)
    6. CLI
"""

import argparse
import collections
import concurrent.futures
import email.utils
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import logging.handlers
import math
import operator
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse

# The agent imports ssl (with libssl) only when its config has a tls section (tls_module());
# http.client imports it if it can, so when this file is the program (run as a script, or
# imported by run_as_import's program) it is kept from it (a program that imports this
# module keeps its http.client whole).
_SSL_UNLOADED = (__name__ == "__main__" or getattr(sys.modules.get("__main__"),
                                                   "HOSTER_HA_PROGRAM", False)) and \
    "ssl" not in sys.modules
if _SSL_UNLOADED:
    sys.modules["ssl"] = None
try:
    import http.client
    import http.server
finally:
    if _SSL_UNLOADED:
        del sys.modules["ssl"]

__version__ = "0.1.0"

API = "/api/v1/ha/"
MAX_BODY = 64 * 1024           # a request body; larger gets 413 unread
MAX_ANSWER = 16 * 1024 * 1024  # an answer we read from a peer (a big host's GET vms)
SIGNATURE_WINDOW = 60
DEFAULT_CONFIG_PATHS = (
    "/usr/local/etc/hoster_ha/ha_config.json",
    "/opt/hoster-core/config_files/ha_config.json",
)
EMERG_BELOW_2 = "candidatesRegistered has gone below 2, initiating self fencing"
VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


ADDRESS_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


def valid_hostname(name):
    return isinstance(name, str) and bool(HOSTNAME_RE.fullmatch(name))


def valid_vm_name(name):
    return isinstance(name, str) and bool(VM_NAME_RE.fullmatch(name))


# =============================================================================
# 1. Config
# =============================================================================

TIMINGS = {
    "ping_interval": 2,
    "ping_timeout": 1.5,
    "survival_window": 10,
    "vote_lease": 6,
    "watchdog_timeout": 10,
    "fence_timeout": 10,
    "failover_time": 60,
}

DEFAULT_COMMANDS = {
    "vm_start": ["hoster", "vm", "start", "{vm}"],
    "vm_cireset": ["hoster", "vm", "cireset", "{vm}"],
    "vm_destroy": ["bhyvectl", "--destroy", "--vm={vm}"],
    "reboot": ["shutdown", "-r", "now"],
    "reboot_now": ["reboot", "-nq"],
    "free_memory": ["sysctl", "-n", "vm.stats.vm.v_free_count", "hw.pagesize"],
    "zfs": ["zfs"],
    "hostname": ["sysctl", "-n", "kern.hostname"],  # the name Hoster compares parent_host with
    # stops what a failed `hoster vm start` launched: Hoster's supervisor runs as
    # "/opt/hoster-core/vm_supervisor_service for NAME" (HosterCore vm/start.go); {vm} is
    # the VM name as a regular expression (dots escaped).  pkill exits 1 if none ran.
    "vm_kill_supervisor": ["pkill", "-9", "-f", "/vm_supervisor_service for {vm}$"],
}

# commands without a default: not run unless configured
OPTIONAL_COMMANDS = {"notify"}   # argv; one JSON object per event on its stdin

STRATEGIES = {
    "change-parent": "change-parent", "changeparent": "change-parent",
    "change_parent": "change-parent", "cireset": "cireset", "ci-reset": "cireset",
}

# Keys of Hoster's own ha_config.json that mean nothing here: accepted and ignored
# (HosterCore internal/app/rest_api_v2/pkg/config/get_ha_config.go).
HOSTER_TOP_KEYS = {"node_type", "startup_time"}
HOSTER_CANDIDATE_KEYS = {"user", "password", "failover_strategy", "failover_time", "backup_node",
                         "startup_time", "registered", "times_failed"}
CANDIDATE_KEYS = {"hostname", "protocol", "address", "port"} | HOSTER_CANDIDATE_KEYS
TOP_KEYS = set(TIMINGS) | HOSTER_TOP_KEYS | {
    "candidates", "failover_strategy", "backup_node", "hostname", "address", "port",
    "listen_address", "secret", "secret_file", "tls", "vm_datasets", "vmm_dir", "commands",
    "run_dir", "state_dir", "log_file", "max_parallel_starts", "kernel_watchdog",
    "hoster_config_dir", "hoster_init_file", "vm_priority", "max_replica_age",
    "restart_after_stop", "start_timeout", "start_confirm", "fence_commands",
}
# Where Hoster looks for its config files, first match wins (HosterCore
# internal/pkg/hoster/locations/locations.go, GetConfigFolders); hoster_config_dir pins one.
HOSTER_CONFIG_DIRS = ("/opt/hoster-core/config_files", "/opt/hoster/config_files",
                      "/usr/local/etc/hoster", "/etc/hoster", "/root/hoster/config_files")
DEFAULT_DATASETS = ["zroot/vm-encrypted", "zroot/vm-unencrypted"]  # Hoster's installer's


class ConfigError(Exception):
    """A configuration problem; str() is the one line printed before exit 2."""


class Config:
    """The validated ha_config.json plus command-line mode; attributes, not a dict."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @property
    def is_candidate(self):
        return self.hostname in self.candidate_names

    @property
    def candidate_names(self):
        return [c["hostname"] for c in self.candidates]

    def candidate(self, name):
        for c in self.candidates:
            if c["hostname"] == name:
                return c
        return None

    def command(self, key, vm=None):
        if vm is not None and key == "vm_kill_supervisor":
            vm = vm.replace(".", "\\.")   # a pattern: VM names may hold dots
        return [a.replace("{vm}", vm) if vm is not None else a for a in self.commands[key]]

    def hoster_file(self, name):
        """Path of Hoster's config file `name` (host_config.json, restapi_config.json), or
        None: in hoster_config_dir if set, else in the first of Hoster's own folders."""
        return hoster_file(self.hoster_config_dir, name)


def hoster_file(folder, name):
    for d in ([folder] if folder else HOSTER_CONFIG_DIRS):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    return None


def hoster_datasets(folder):
    """(datasets, where they come from, whether that is worth a warning): Hoster's
    active_datasets (host_config.json), else the installer's defaults."""
    path = hoster_file(folder, "host_config.json")
    where = folder or ", ".join(HOSTER_CONFIG_DIRS)
    if path is None:
        return list(DEFAULT_DATASETS), f"defaults: no Hoster host_config.json in {where}", False
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return list(DEFAULT_DATASETS), f"defaults: cannot read {path}: {str(e)[:200]}", True
    ds = data.get("active_datasets") if isinstance(data, dict) else None
    if not (isinstance(ds, list) and ds and all(
            isinstance(d, str) and d and not d.startswith("-") and "\0" not in d for d in ds)):
        return list(DEFAULT_DATASETS), f"defaults: {path} has no valid active_datasets", True
    return list(ds), f"Hoster's active_datasets in {path}", False


def kernel_watchdog_seconds(watchdog_timeout):
    """The watchdog(4) timeout: (N, 2**N ns in seconds, whole seconds S) where S is
    watchdog_timeout + 5 rounded up and 2**N ns the smallest power of two >= S
    (watchdog(8) -t takes whole seconds and rounds them up to 2**N ns the same way)."""
    whole = math.ceil(watchdog_timeout + 5)
    n = 0
    while 2 ** n < whole * 1e9:
        n += 1
    return n, 2 ** n / 1e9


def find_config_path(explicit=None):
    if explicit:
        return explicit
    env = os.environ.get("HOSTER_HA_CONFIG")
    if env:
        return env
    for p in DEFAULT_CONFIG_PATHS:
        if os.path.exists(p):
            return p
    return DEFAULT_CONFIG_PATHS[0]


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _key(name):
    """A key name quoted for a one-line message, whatever characters it holds."""
    return "'" + name.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _port(v, path, key):
    if isinstance(v, str) and v.isascii() and v.isdigit():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
        raise ConfigError(f"{path}: key '{key}': expected a port number 1-65535, got {v!r}")
    return v


def read_secret_file(path, cfg_path):
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{cfg_path}: key 'secret_file': cannot read {path}: {e.strerror}")
    if st.st_mode & 0o077:
        raise ConfigError(f"{cfg_path}: key 'secret_file': {path} is readable by group or "
                          f"others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{cfg_path}: key 'secret_file': cannot read {path}: {e.strerror}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{cfg_path}: key 'secret_file': {path} is not UTF-8")
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    return text


def load_config(path, debug=False):
    """Read and validate ha_config.json.  Raises ConfigError naming file and key."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON: {str(e)[:200]}")
    return parse_config(data, path, debug)


def _config_getter(data, path):
    """get(key, kind, default): data[key] (or default) checked to be of `kind`."""
    def get(key, kind, default):
        v = data.get(key, default)
        ok = {"number": _is_number(v),
              "bool": isinstance(v, bool),
              "str": isinstance(v, str) and v != "",
              "int": isinstance(v, int) and not isinstance(v, bool)}[kind]
        if not ok:
            raise ConfigError(f"{path}: key '{key}': expected {kind}, got {v!r}")
        return v
    return get


def _config_timings(path, get):
    """The timings of SPEC §2, checked against each other (the §2 rule), and
    kernel_watchdog."""
    timings = {k: get(k, "number", d) for k, d in TIMINGS.items()}
    for k, v in timings.items():
        if not 0 < v <= 86400:
            raise ConfigError(f"{path}: key '{k}': must be greater than 0 and at most 86400 "
                              f"seconds, got {v}")
    if timings["ping_timeout"] >= timings["ping_interval"]:
        raise ConfigError(f"{path}: key 'ping_timeout': must be less than ping_interval "
                          f"({timings['ping_timeout']} >= {timings['ping_interval']})")
    kernel_wd = get("kernel_watchdog", "bool", False)
    guard = timings["watchdog_timeout"] + timings["fence_timeout"]
    guard_text = (f"watchdog_timeout ({timings['watchdog_timeout']}) + "
                  f"fence_timeout ({timings['fence_timeout']})")
    if kernel_wd:
        _, ksec = kernel_watchdog_seconds(timings["watchdog_timeout"])
        if ksec > guard:
            guard, guard_text = ksec, f"kernel watchdog timeout ({ksec:g})"
    need = timings["survival_window"] + guard + 2 * timings["ping_interval"] + 5
    if timings["failover_time"] < round(need, 9):
        raise ConfigError(
            f"{path}: key 'failover_time': {timings['failover_time']} is too small: it must be >= "
            f"survival_window ({timings['survival_window']}) + {guard_text} + "
            f"2*ping_interval ({2 * timings['ping_interval']}) + 5 = {need:g}")
    return timings, kernel_wd


def _config_candidates(cands, path):
    """The 3 candidates: [{hostname, address, port, protocol}]."""
    if not isinstance(cands, list):
        raise ConfigError(f"{path}: key 'candidates': expected a list of exactly 3 candidates")
    if len(cands) != 3:
        raise ConfigError(f"{path}: key 'candidates': expected exactly 3 candidates, got {len(cands)}")
    candidates = []
    for i, c in enumerate(cands):
        where = f"candidates[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(f"{path}: key '{where}': expected an object")
        bad = sorted(set(c) - CANDIDATE_KEYS)
        if bad:
            raise ConfigError(f"{path}: key {_key(where + '.' + bad[0])}: unknown key")
        for k in ("hostname", "address", "port"):
            if k not in c:
                raise ConfigError(f"{path}: key '{where}.{k}': missing")
        if not valid_hostname(c["hostname"]):
            raise ConfigError(f"{path}: key '{where}.hostname': not a valid hostname: {c['hostname']!r}")
        if not isinstance(c["address"], str) or not c["address"]:
            raise ConfigError(f"{path}: key '{where}.address': expected a non-empty string")
        proto = c.get("protocol", "http")
        if proto not in ("http", "https"):
            raise ConfigError(f"{path}: key '{where}.protocol': expected http or https, got {proto!r}")
        candidates.append({"hostname": c["hostname"], "address": c["address"],
                           "port": _port(c["port"], path, f"{where}.port"), "protocol": proto})
    names = [c["hostname"].lower() for c in candidates]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"{path}: key 'candidates': duplicate hostname {n!r}")
    eps = [(c["address"], c["port"]) for c in candidates]
    for e in eps:
        if eps.count(e) > 1:
            raise ConfigError(f"{path}: key 'candidates': duplicate address:port {e[0]}:{e[1]}")
    return candidates


def _config_identity(data, path, get, candidates):
    """This node: (hostname, address, port, protocol); a candidate's come from its
    entry in candidates."""
    hostname = data.get("hostname", socket.gethostname())
    if not valid_hostname(hostname):
        raise ConfigError(f"{path}: key 'hostname': not a valid hostname: {hostname!r}")
    own = next((c for c in candidates if c["hostname"] == hostname), None)
    if own:
        address = get("address", "str", own["address"])
        port = _port(data.get("port", own["port"]), path, "port")
        protocol = own["protocol"]
    else:
        for k in ("address", "port"):
            if k not in data:
                raise ConfigError(f"{path}: key '{k}': required on a worker "
                                  f"({hostname!r} is not one of the candidates)")
        address = get("address", "str", None)
        port = _port(data["port"], path, "port")
        protocol = "https" if data.get("tls") else "http"
    return hostname, address, port, protocol


def _config_secret(data, path, get):
    """The shared secret, from `secret` or `secret_file`."""
    if "secret" in data and "secret_file" in data:
        raise ConfigError(f"{path}: key 'secret_file': set either secret or secret_file, not both")
    if "secret" in data:
        secret = get("secret", "str", None)
    elif "secret_file" in data:
        secret = read_secret_file(get("secret_file", "str", None), path)
    else:
        raise ConfigError(f"{path}: key 'secret': missing; set secret or secret_file "
                          f"(hoster_ha.py gen-secret makes one)")
    if len(secret) < 16:
        raise ConfigError(f"{path}: key 'secret': too short ({len(secret)} characters, need 16 or more)")
    return secret


def _config_tls(data, path, candidates):
    """tls ({cert, key, ca}) or None; required when a candidate uses https."""
    tls = data.get("tls")
    if tls is not None:
        if not isinstance(tls, dict) or set(tls) - {"cert", "key", "ca"} or not all(
                isinstance(tls.get(k), str) and tls.get(k) for k in ("cert", "key", "ca")):
            raise ConfigError(f"{path}: key 'tls': expected {{\"cert\": PATH, \"key\": PATH, \"ca\": PATH}}")
    if any(c["protocol"] == "https" for c in candidates) and tls is None:
        raise ConfigError(f"{path}: key 'tls': required when a candidate uses protocol https")
    return tls


def _config_datasets(data, path):
    """(hoster_config_dir, VM datasets, where they came from, warn about it)."""
    hoster_dir = data.get("hoster_config_dir")
    if hoster_dir is not None and (not isinstance(hoster_dir, str) or not hoster_dir):
        raise ConfigError(f"{path}: key 'hoster_config_dir': expected a path")
    if "vm_datasets" in data:
        datasets = data["vm_datasets"]
        if not isinstance(datasets, list) or not all(isinstance(d, str) and d for d in datasets):
            raise ConfigError(f"{path}: key 'vm_datasets': expected a list of dataset names")
        ds_source, ds_warn = f"vm_datasets in {path}", False
    else:
        datasets, ds_source, ds_warn = hoster_datasets(hoster_dir)
    return hoster_dir, datasets, ds_source, ds_warn


def _config_commands(data, path):
    """The host commands: the defaults, with those of `commands` in their place."""
    commands = dict(DEFAULT_COMMANDS)
    cmds = data.get("commands", {})
    if not isinstance(cmds, dict):
        raise ConfigError(f"{path}: key 'commands': expected an object")
    for k, v in cmds.items():
        if k not in DEFAULT_COMMANDS and k not in OPTIONAL_COMMANDS:
            raise ConfigError(f"{path}: key {_key('commands.' + k)}: unknown command")
        if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
            raise ConfigError(f"{path}: key 'commands.{k}': expected a non-empty list of strings")
        commands[k] = list(v)
    return commands


def _config_starts(data, path, get):
    """start_timeout, start_confirm, max_parallel_starts, vm_priority, max_replica_age,
    log_file."""
    start_timeout = get("start_timeout", "number", 60)
    if not 0 < start_timeout <= 3600:
        raise ConfigError(f"{path}: key 'start_timeout': must be greater than 0 and at most "
                          f"3600 seconds, got {start_timeout}")
    start_confirm = get("start_confirm", "number", 3)
    if not 0 < start_confirm <= 600:
        raise ConfigError(f"{path}: key 'start_confirm': must be greater than 0 and at most "
                          f"600 seconds, got {start_confirm}")
    mps = get("max_parallel_starts", "int", DEFAULT_PARALLEL_STARTS)
    if not 1 <= mps <= MAX_PARALLEL_STARTS:
        raise ConfigError(f"{path}: key 'max_parallel_starts': must be 1 to "
                          f"{MAX_PARALLEL_STARTS} (starts at once on one target), got {mps}")
    prio = data.get("vm_priority", {})
    if not isinstance(prio, dict):
        raise ConfigError(f"{path}: key 'vm_priority': expected an object (VM name -> integer)")
    for k, v in prio.items():
        if not valid_vm_name(k):
            raise ConfigError(f"{path}: key {_key('vm_priority.' + k)}: not a valid VM name")
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{path}: key 'vm_priority.{k}': expected an integer, got {v!r}")
    max_age = get("max_replica_age", "number", 86400)
    if not max_age > 0:
        raise ConfigError(f"{path}: key 'max_replica_age': must be greater than 0 seconds, "
                          f"got {max_age}")
    log_file = data.get("log_file")
    if log_file is not None and (not isinstance(log_file, str) or not log_file):
        raise ConfigError(f"{path}: key 'log_file': expected a path")
    return start_timeout, start_confirm, mps, prio, max_age, log_file


def valid_fence_argv(argv):
    """A fence command (fence_commands): a list of 1-32 strings, the first an absolute
    path, none empty, longer than 1,024 characters or holding a NUL."""
    return isinstance(argv, list) and 1 <= len(argv) <= 32 and \
        all(isinstance(a, str) and a and len(a) <= 1024 and "\0" not in a for a in argv) and \
        argv[0].startswith("/")


def _config_fencing(data, path):
    """fence_commands (issue 13 item 5): {member: argv} of the external fences this node
    runs as manager, each an argv that powers that member off (its BMC) and exits 0 only
    once it is confirmed off.  Only from this file: an argv never comes over the network
    (a node holding the cluster secret must not make a candidate run anything)."""
    cmds = data.get("fence_commands", {})
    if not isinstance(cmds, dict):
        raise ConfigError(f"{path}: key 'fence_commands': expected an object (member -> argv)")
    for k, argv in cmds.items():
        if not valid_hostname(k):
            raise ConfigError(f"{path}: key {_key('fence_commands.' + k)}: not a valid hostname")
        if not valid_fence_argv(argv):
            raise ConfigError(f"{path}: key 'fence_commands.{k}': expected a list of 1 to 32 "
                              "non-empty strings, the first an absolute path")
    return {k: list(v) for k, v in cmds.items()}


def parse_config(data, path="<config>", debug=False):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: key {_key(unknown[0])}: unknown key")

    get = _config_getter(data, path)
    timings, kernel_wd = _config_timings(path, get)
    candidates = _config_candidates(data.get("candidates"), path)
    hostname, address, port, protocol = _config_identity(data, path, get, candidates)
    secret = _config_secret(data, path, get)
    strategy = get("failover_strategy", "str", "change-parent")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{path}: key 'failover_strategy': expected one of "
                          f"{', '.join(sorted(STRATEGIES))}, got {strategy!r}")

    tls = _config_tls(data, path, candidates)
    hoster_dir, datasets, ds_source, ds_warn = _config_datasets(data, path)
    commands = _config_commands(data, path)
    start_timeout, start_confirm, mps, prio, max_age, log_file = _config_starts(data, path, get)
    fence_commands = _config_fencing(data, path)
    return Config(
        path=os.path.abspath(path) if path != "<config>" else path,
        debug=debug,
        candidates=candidates,
        hostname=hostname,
        address=address,
        port=port,
        protocol=protocol,
        listen_address=get("listen_address", "str", "0.0.0.0"),
        secret=secret,
        tls=tls,
        failover_strategy=STRATEGIES[strategy],
        backup_node=get("backup_node", "bool", False),
        vm_datasets=datasets,
        vm_datasets_source=ds_source,
        vm_datasets_warn=ds_warn,
        hoster_config_dir=hoster_dir,
        hoster_init_file=get("hoster_init_file", "str", "/var/run/hoster_init"),
        vmm_dir=get("vmm_dir", "str", "/dev/vmm"),
        commands=commands,
        run_dir=get("run_dir", "str", "/var/run"),
        state_dir=get("state_dir", "str", "/var/db/hoster_ha"),
        log_file=log_file,
        max_parallel_starts=mps,
        start_timeout=start_timeout,
        start_confirm=start_confirm,
        kernel_watchdog=kernel_wd,
        vm_priority=dict(prio),
        max_replica_age=max_age,
        restart_after_stop=get("restart_after_stop", "bool", True),
        fence_commands=fence_commands,
        **timings,
    )


# =============================================================================
# 2. Core: pure cluster logic
#
# Nothing here reads a clock, opens a socket, runs a command or touches a file.
# Every method takes `now` (seconds on this node's monotonic clock) and inputs;
# decisions come back as actions (Core.take_actions() says which) that one executor
# per world carries out: Agent.execute in production, Sim._actions in
# tests/sim.py.  The host-side rules (what a fence records and locks, what a
# returning host demotes, the running record) are pure functions at the end of
# this section; both executors call them.
# =============================================================================

class Vote:
    """A candidate's single vote: for one incarnation of one candidate."""

    __slots__ = ("holder", "holder_startup", "term", "renewed_at")

    def __init__(self, holder, holder_startup, term, renewed_at):
        self.holder, self.holder_startup = holder, holder_startup
        self.term, self.renewed_at = term, renewed_at


class Member:
    """A candidate's record of one member (SPEC §3.1)."""

    FIELDS = ("hostname", "address", "port", "protocol", "startup_time", "backup_node",
              "failover_strategy", "failover_time", "fenced_vms", "stopped_vms",
              "locked_vms")

    def __init__(self, body, now):
        for k in self.FIELDS:
            setattr(self, k, body.get(k))
        # optional: the production VMs it ran before an orderly stop (restart_after_stop),
        # and those its fence locked while they were stopped (issue 11 item 2.2)
        for k in ("stopped_vms", "locked_vms"):
            v = getattr(self, k)
            if not (isinstance(v, list) and all(valid_vm_name(x) for x in v)):
                setattr(self, k, [])
        self.armed = False
        self.maintenance = False
        self.left = False
        self.ready = None          # from its pings: True, False, None (not said yet)
        self.not_ready = []
        self.seq = -1              # the member's last applied ping/leave sequence number
        self.last_ping = now
        self.fence_confirmed = None  # this incarnation's confirmed fence (POST fenced): its
        #                              record {ts, reason, vms, locked}, or None

    SAVED = FIELDS + ("armed", "maintenance", "left", "seq", "fence_confirmed")

    def saved(self):
        """The record as written to state_dir/members.json (no ping times: after a restart
        a member's silence counts from the candidate's own start, SPEC §3.4)."""
        return {k: getattr(self, k) for k in self.SAVED}

    @classmethod
    def load(cls, rec, now):
        """A record read back from members.json, or None if it is not a valid one."""
        if check_fields(rec, REGISTER_FIELDS) is not None or \
                not valid_hostname(rec["hostname"]):
            return None
        m = cls(rec, now)
        m.last_ping = -math.inf   # not heard in this incarnation: not alive for a vote;
        #                           its silence counts from our start (members_view)
        m.armed, m.maintenance, m.left = (rec.get(k) is True for k in
                                          ("armed", "maintenance", "left"))
        m.fence_confirmed = rec.get("fence_confirmed") if \
            isinstance(rec.get("fence_confirmed"), dict) else None
        seq = rec.get("seq")
        m.seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else -1
        return m


class PingAnswer:
    """What a candidate answered to one of our pings, and when we sent that ping."""

    __slots__ = ("vote", "vote_startup_time", "vote_term", "vote_lease", "manager", "term",
                 "term_seen", "sent_at")

    def __init__(self, body, sent_at):
        self.vote = body["vote"]
        self.vote_startup_time = body["vote_startup_time"]
        self.vote_term = body["vote_term"]
        self.vote_lease = body["vote_lease_ms"] / 1000.0
        self.manager = body["manager"]
        self.term = body["term"]
        seen = body.get("term_seen")
        self.term_seen = seen if isinstance(seen, int) and not isinstance(seen, bool) else 0
        self.sent_at = sent_at


# Field schemas of request and answer bodies: name -> accepted types.  The
# transport checks bodies against these before the core sees them.
_INT = (int,)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
REGISTER_FIELDS = {"hostname": (str,), "address": (str,), "port": _INT, "protocol": (str,),
                   "startup_time": _INT, "backup_node": (bool,), "failover_strategy": (str,),
                   "failover_time": (int, float), "fenced_vms": (list,)}
PING_FIELDS = {"hostname": (str,), "startup_time": _INT, "armed": (bool,),
               "maintenance": (bool,), "manager": (bool,), "term": _INT}
PING_ANSWER_FIELDS = {"vote": _OPT_STR, "vote_startup_time": _OPT_INT, "vote_term": _INT,
                      "vote_lease_ms": _INT, "manager": _OPT_STR, "term": _INT}
MEMBER_VIEW_FIELDS = {"hostname": (str,), "startup_time": _INT, "silence": (int, float),
                      "armed": (bool,), "maintenance": (bool,), "left": (bool,),
                      "backup_node": (bool,), "failover_time": (int, float), "address": (str,),
                      "port": _INT, "protocol": (str,)}
PLAN_FIELDS = {"vm": (str,), "from": (str,), "to": (str,), "term": _INT, "uid": (str,),
               "state": (str,), "seq": _INT}
PLAN_BODY_FIELDS = {"term": _INT, "entries": (list,)}
PLAN_STATES = ("planned", "done", "failed", "abandoned")
FAILOVER_FIELDS = {"vm_name": (str,), "from_host": (str,), "term": _INT, "uid": (str,)}
LEAVE_FIELDS = {"hostname": (str,), "startup_time": _INT}
FENCED_FIELDS = {"hostname": (str,), "startup_time": _INT, "record": (dict,)}
INVENTORY_TIMEOUT = 30   # s: a GET vms answer (zfs list on the member)
EXTERNAL_FENCE_TIMEOUT = 60   # s: a member's fence command (a BMC's power off)
PROTECTION_INTERVAL = 30.0  # s: the manager re-checks every VM's protection this often
                            # (or every 10 ping_intervals, if that is sooner)
PREFETCH_LEAD = 1.0      # s: inventories asked for this long before a member's deadline,
#                          and used by its failover job if asked for at most this long ago
MAX_PLANS = 500          # failover plans a candidate keeps (finished ones are dropped first)
RETRY_MAX = 15           # s: longest delay between two tries to place an unplaced VM
MAX_PARALLEL_STARTS = 64  # bound of max_parallel_starts: `hoster vm start`s at once on one
                          # target (a VM's start confirmation does not hold one)
DEFAULT_PARALLEL_STARTS = 16
FENCING = "this node is fencing itself"   # a start refused or stopped before it ran


class Refused(str):
    """Why a start queued for a slot was refused when it got one (maintenance, leave:
    FailoverTarget.start_refusal): nothing touched the VM, and the manager places it
    again."""
MAX_BATCH = 128           # entries of one POST failover (a batch: issue 13 item 1), and the
                          # starts a manager has out to one target that takes batches
MAX_STARTS_AT_ONCE = 1024  # failover starts a manager has under way, all targets together
MAX_START_REQUESTS = 48    # targets a manager has a POST failover out to at once (the
                           # agent's send threads: MAX_PARALLEL_STARTS + 8)
WATCHDOG_GONE_CHECKS = 3  # consecutive checks that find the ha_watchdog gone (§3.5)
LOCK_PREFIX = "__HA_LOCKED_"   # parent_host of a VM locked by a fence (SPEC §3.3)


def clean_readiness(body):
    """(ready, not_ready) from a ping body or a GET vms host object: ready True, False or
    None (not said); not_ready at most 10 reason strings of at most 300 characters."""
    ready = body.get("ready") if isinstance(body.get("ready"), bool) else None
    reasons = body.get("not_ready")
    reasons = [r[:300] for r in reasons if isinstance(r, str)][:10] \
        if isinstance(reasons, list) else []
    return ready, reasons


def check_fields(body, schema):
    """Return an error text if body lacks a field of schema or has a wrong type, else None."""
    if not isinstance(body, dict):
        return "expected a JSON object"
    for k, types in schema.items():
        if k not in body:
            return f"missing field '{k}'"
        v = body[k]
        if isinstance(v, bool) and bool not in types:
            return f"field '{k}' has the wrong type"
        if not isinstance(v, types):
            return f"field '{k}' has the wrong type"
    return None


def check_failover_entry(e):
    """Why a POST failover body (or one entry of a batch) is malformed, or None."""
    why = check_fields(e, FAILOVER_FIELDS)
    if why is None and not valid_vm_name(e["vm_name"]):
        why = "field 'vm_name' is not a valid VM name"
    if why is None and not valid_hostname(e["from_host"]):
        why = "field 'from_host' is not a valid hostname"
    return why


def check_plan_entry(e):
    """An error text for a malformed plan entry, else None."""
    why = check_fields(e, PLAN_FIELDS)
    if why is None and not valid_vm_name(e["vm"]):
        why = "field 'vm' is not a valid VM name"
    if why is None and not (valid_hostname(e["from"]) and valid_hostname(e["to"])):
        why = "fields 'from' and 'to' must be hostnames"
    if why is None and e["state"] not in PLAN_STATES:
        why = "field 'state' is not a plan state"
    return why


def _snapshot(s):
    if isinstance(s, dict) and isinstance(s.get("creation"), int) and \
            not isinstance(s.get("creation"), bool):
        return {"name": str(s.get("name", "")), "creation": s["creation"],
                "guid": str(s.get("guid", ""))}
    return None


def clean_inventory(answer):
    """A GET vms answer reduced to well-typed fields, or None if it is not one."""
    if not isinstance(answer, dict) or not isinstance(answer.get("host"), dict) or \
            not isinstance(answer.get("vms"), list):
        return None
    h = answer["host"]
    free, running, wall = h.get("free_memory"), h.get("running_vms"), h.get("time")
    slots = h.get("max_parallel_starts")
    ready, not_ready = clean_readiness(h)
    host = {"hostname": h.get("hostname"),
            "time": wall if _is_number(wall) else None,
            # its start limit (issue 13); None from an older version
            "max_parallel_starts": slots if isinstance(slots, int) and
            not isinstance(slots, bool) and 1 <= slots <= MAX_PARALLEL_STARTS else None,
            "free_memory": free if isinstance(free, int) and not isinstance(free, bool) else None,
            "running_vms": running if isinstance(running, int) and
            not isinstance(running, bool) else 0,
            "ready": ready is not False, "not_ready": not_ready}
    vms = [{"vm_name": v["vm_name"], "production": v.get("production") is True,
            "live": v.get("live") is True, "state": v.get("state"),
            "ready": v.get("ready") is not False,
            "parent_host": v.get("parent_host") if isinstance(v.get("parent_host"), str) else None,
            "latest_snapshot": _snapshot(v.get("latest_snapshot"))}
           for v in answer["vms"] if isinstance(v, dict) and valid_vm_name(v.get("vm_name"))]
    return {"host": host, "vms": vms}


# -- failover placement (§3.4 step 2-3): a pure function ---------------------------

def ranked_targets(copies, eligible, inventories):
    """The hosts that may start a VM, best first (SPEC §3.4 step 2): eligible, ready for
    it and holding a snapshot; newest snapshot first, then most free memory, then fewest
    running VMs, then the name.  copies: [(host, its copy)]."""
    targets = []
    for host, v in copies:
        snap = v.get("latest_snapshot")
        if not eligible.get(host) or not snap or v.get("ready") is False:
            continue
        h = inventories[host].get("host", {})
        free = h.get("free_memory")
        targets.append((-snap["creation"], -(free if free is not None else -1),
                        h.get("running_vms", 0), host))
    return [t[3] for t in sorted(targets)]


def plan_failover(sources, inventories, eligible, busy=(), failed=None, left=(),
                  owners=None, skipped=None, last_ran=None):
    """Decide which VMs to restart where.

    sources:     {host: set of VM names from its fence record} for every failed member
                 (and every rejoined member that sent a fence record);
    inventories: {host: GET vms answer} of every member that is neither failed nor left;
    eligible:    {host: True if it may receive VMs} (armed, not backup, maintenance, left);
                 besides, a copy whose entry says "ready": false (its host cannot start
                 it: Hoster not initialised, no vmm, its dataset unavailable) is no target;
    busy:        VM names already being handled (a plan in flight);
    left:        members that left: a VM a copy of which names one of them as its
                 parent_host is never moved (SPEC §3.4 step 1: its VMs run on, unprotected);
    owners:      {vm: hosts} for VMs wanted only because a failover plan moved them to a
                 failed source: such a VM is not moved if a copy names another parent_host
                 (it was moved on since, e.g. by the operator);
    skipped:     a list that gets (vm, from_host, reason) for VMs left alone by those rules;
    last_ran:    {vm: host} where the latest done failover plan of a VM started it: a VM
                 last started on a member that left is never moved (SPEC §3.4 step 1; a
                 left member is not asked for its inventory, and replicas may still name
                 an older parent_host).
    Returns (moves, unplaced): moves = [(vm, from_host, [targets, best first])],
    unplaced = [(vm, from_host, reason)], both sorted by VM name.
    """
    live, copies, production = set(), {}, set()
    for host, inv in inventories.items():
        for v in inv.get("vms", []):
            name = v["vm_name"]
            if v.get("live") or v.get("state") == "starting":
                live.add(name)
            copies.setdefault(name, []).append((host, v))
            if v.get("production"):
                production.add(name)
    failed = set(sources) if failed is None else set(failed)
    wanted = {}    # vm -> its source: a failed member's production VMs, and fence records
    for src, fenced in sources.items():
        for name, cs in copies.items():
            if src not in failed:
                break  # a rejoined member that is up: only its fence record
            if name in production and any(v.get("parent_host") == src for _, v in cs):
                wanted.setdefault(name, src)
        for name in fenced:
            wanted.setdefault(name, src)
    moves, unplaced = [], []
    left, owners = set(left), owners or {}
    for name in sorted(wanted):
        src = wanted[name]
        if name in live or name in busy:
            continue
        parents = {v.get("parent_host") for _, v in copies.get(name, [])}
        gone = sorted(p for p in parents & left if isinstance(p, str))
        ran = (last_ran or {}).get(name)
        if ran in left and ran not in gone:
            gone.append(ran)
        other = sorted(p for p in parents if isinstance(p, str) and
                       not p.startswith(LOCK_PREFIX)) if name in owners else []
        other = [p for p in other if p not in owners.get(name, ())]
        if gone or other:
            if skipped is not None:
                skipped.append((name, src, (f"its parent_host is {gone[0]}" if gone[0] in
                                            parents else f"its latest failover plan started "
                                            f"it on {gone[0]}") + ", which left the cluster"
                                if gone else f"a copy names {', '.join(other)} as "
                                "its parent_host (moved since)"))
            continue
        targets = ranked_targets(copies.get(name, []), eligible, inventories)
        if targets:
            moves.append((name, src, targets))
        else:
            holders = sorted(h for h, _ in copies.get(name, []))
            unplaced.append((name, src, "no eligible member holds a snapshot of it"
                             + (f" (copies on {', '.join(holders)}: backup, unarmed, in "
                                "maintenance, not ready or without snapshot)" if holders else
                                " (no copy on any reachable member)")))
    return moves, unplaced


def plan_restart(host, vms, inventories, busy=(), last_ran=None, skipped=None, left=(),
                 waiting=None, locked=False):
    """Which of `vms` -- the production VMs member `host` ran before an orderly stop --
    to start again on `host` alone (issue 14 item 5; an orderly stop is not a failure,
    so never on a replica elsewhere).  locked=True: which of `vms` -- the production VMs
    host's fence locked while they were stopped (issue 11 item 2.2) -- get host back as
    their parent_host, unstarted: the same rules, except that host's copy must be locked
    (a lock elsewhere is not another parent).  inventories: {member: GET vms answer} of every
    member neither failed nor left, `host` included.  A VM is started only if it is
    live nowhere, no plan for it is in flight (busy), host's copy is production and
    still names host as its parent_host, no other copy names another parent_host, and
    its latest done failover plan (last_ran) did not start it elsewhere -- so a VM a copy
    of which names a member that left (not asked: its VMs may run) is never started.
    skipped gets
    (vm, host, reason) for the rest; waiting gets (vm, host, reason) for those that host
    cannot start yet (not ready: Hoster not initialised, its dataset locked), to be
    tried again.  Returns the VM names, sorted."""
    copies = {}
    for h, inv in inventories.items():
        for v in inv.get("vms", []):
            copies.setdefault(v["vm_name"], []).append((h, v))
    out = []
    for name in sorted(vms):
        cs = copies.get(name, [])
        live = sorted(h for h, v in cs if v.get("live") or v.get("state") == "starting")
        own = next((v for h, v in cs if h == host), None)
        others = sorted(p for p in {v.get("parent_host") for h, v in cs if h != host} -
                        {host, None} if not (locked and is_locked(p)))
        ran = (last_ran or {}).get(name)
        host_inv = inventories.get(host, {}).get("host", {})
        why = (None if name not in busy else "a failover plan for it is under way")
        why = why or (f"it runs on {', '.join(live)}" if live else None)
        if why is None and own is None and locked and host_inv.get("ready") is False:
            if waiting is not None:   # its copy may be on a dataset that is not available
                waiting.append((name, host, "not ready: " + ("; ".join(
                    host_inv.get("not_ready") or []) or "its dataset is not available")))
            continue
        why = why or (f"{host} holds no copy of it" if own is None else None)
        why = why or ("it is not a production VM" if not own.get("production") else None)
        why = why or (f"its parent_host here is {own.get('parent_host')}"
                      if (not is_locked(own.get("parent_host")) if locked else
                          own.get("parent_host") != host) else None)
        why = why or (f"a copy names {', '.join(others)} as its parent_host"
                      + (" (it left the cluster: its VMs may run there)"
                         if set(others) & set(left) else "") if others else None)
        why = why or (f"its latest failover plan started it on {ran}"
                      if ran not in (None, host) else None)
        if why is None and (own.get("ready") is False or host_inv.get("ready") is False):
            if waiting is not None:
                waiting.append((name, host, "not ready: " + ("; ".join(
                    host_inv.get("not_ready") or []) or "its dataset is not available")))
        elif why is None:
            out.append(name)
        elif skipped is not None and not (name in busy or live and host in live):
            skipped.append((name, host, why))
    return out


def vm_protection(inventories, eligible, max_age):
    """Would each production VM survive its host's failure (issue 14 item 1)?

    inventories: {host: GET vms answer, clean_inventory'd}; the host object's `time` (its
                 wall clock when it answered) dates the snapshots that host holds;
    eligible:    {host: True if it may receive VMs}, as for plan_failover;
    max_age:     seconds: a newest replica on an eligible member older than this is
                 `replica too old`.
    Returns {vm: {"protected", "protection", "replica_age_seconds", "host"}} for every VM
    a copy of which is production.  `host`: where it runs, else its parent_host (its
    home: a copy there is not a replica).  `protection` is None or the reason: `no
    replica` (no other member holds a snapshot of it), `no eligible target` (only backup
    nodes and members that are unarmed, not ready, in maintenance or left do),
    `replica too old`.  `replica_age_seconds`: the age of the newest snapshot on an
    eligible member, None if there is none (or its host did not say its time)."""
    copies, production = {}, set()
    for host, inv in inventories.items():
        for v in inv.get("vms", []):
            copies.setdefault(v["vm_name"], []).append((host, v))
            if v.get("production"):
                production.add(v["vm_name"])
    out = {}
    for name in sorted(production):
        cs = copies[name]
        live = sorted(h for h, v in cs if v.get("live") or v.get("state") == "starting")
        parents = sorted({v.get("parent_host") for _, v in cs if v.get("production")} &
                         set(inventories))
        home = set(live) | set(parents)
        replicas = [(h, v) for h, v in cs if h not in home and v.get("latest_snapshot")]
        # a target that cannot start this VM (not ready: Hoster not initialised, its
        # dataset locked) does not protect it
        ok = [(h, v["latest_snapshot"]) for h, v in replicas if eligible.get(h) and
              v.get("ready") is not False and
              inventories[h].get("host", {}).get("ready") is not False]
        ages = [inventories[h]["host"]["time"] - snap["creation"] for h, snap in ok
                if _is_number(inventories[h].get("host", {}).get("time"))]
        age = round(max(0.0, min(ages)), 3) if ages else None
        why = ("no replica" if not replicas else "no eligible target" if not ok else
               "replica too old" if age is not None and age > max_age else None)
        out[name] = {"protected": why is None, "protection": why, "replica_age_seconds": age,
                     "host": (live or parents or [None])[0]}
    return out


# -----------------------------------------------------------------------------
# 2a. The core: one node's cluster state and every decision it makes, in parts
#
# A node's core is pure: it takes the time and its inputs as arguments and returns
# decisions as actions; the agent (Agent, below) and the simulator (tests/sim.py)
# execute them.  Core is a thin facade over ten named parts that share one ordered
# outbox (Outbox: the action kinds and their ordering rules are in its docstring):
#
#   Election         votes, leases and terms (SPEC §3.2): who is the manager
#   Membership       a candidate's table of members (§3.1, §3.4 the views), leave (§3.7)
#   Link             this node as a member: its pings, quorum, arming, the survival
#                    rule and its fence (§3.3), maintenance and leave
#   Rejoin           back from a fence or a power loss: demotion of moved VMs (§3.6),
#                    the datasets and readiness of this host (issue 11)
#   PlanBook         failover plans replicated to the candidates, and where each VM
#                    last ran (the book, §3.4)
#   Detector         the manager's failure detection from 2 views (§3.4 step 1), and
#                    what needs a failover job (sources, episodes)
#   Protection       the manager's round: would each VM survive its host's failure
#   FailoverManager  the manager's failover job (Job): inventories, plan, replication,
#                    starts (§3.4 steps 2-4)
#   FailoverTarget   this node as a failover target: POST failover (§3.4)
#
# Core.tick states the order of a step; Core delegates the agent's calls to the part
# that owns them.  Parts reach one another by name (self.election, self.link, ...).
# -----------------------------------------------------------------------------


class Outbox:
    """The core's one ordered output, shared by every part, and the manager's requests
    that wait for an answer."""

    def __init__(self):
        self.out = []
        self.said = set()          # keys of once(): a state is logged once
        self.saved = {}            # file -> the data last handed out in a "persist" action
        self.pending = {}          # request id -> (purpose, on_answer)
        self.next_id = 0

    def persist_term(self, term):
        self.out.append({"kind": "persist_term", "term": term})

    def action(self, kind, **fields):
        self.out.append(dict(fields, kind=kind))

    def take_actions(self):
        """The core's output: a list of dicts with a "kind", in the order they were decided.

          event               {"event", "level", "msg", "details"}: one log line (syslog level
                              name) and, for the names in EVENT_NAMES, a line of events.jsonl.
          persist_term        {"term"}: write state_dir/term (fsync).  Terms only grow.
          persist             {"file", "data"}: write state_dir/FILE (members.json, plans.json;
                              JSON, atomically): a candidate's table and plan book.
          send                {"id", "to", "peer", "method", "name", "body", "timeout",
                              "purpose"}: a manager's request; its answer (status None: no
                              answer) goes back to Core.on_response(id, ...); purpose names
                              what it is for (e.g. "vms" a failover's inventory, "pvms" a
                              protection round's), for logs and tests.
          demote              {"vms": {vm: new parent}, "keep_live"}: §3.6, the local copies of
                              VMs moved away become backups; the executor applies
                              demotion_steps() to its local copies, then calls
                              Core.demote_done() with what it handled.
          fence               {"reason"}: §3.3 steps 2-4.  The executor applies fence_plan() to
                              a fresh inventory (write the record, lock, destroy, reboot); the
                              core is already `fenced` and accepts no failover from now on.
          clear_fence_record  {}: we armed; the candidates have our fence record (register):
                              remove state_dir/fence.json (kept in debug mode).
          record_running      {}: rewrite state_dir/running.json from a fresh inventory by
                              Core.running_record() (we armed, or were asked to).
          restore             {"vms"}: issue 11 item 2.2, copies our fence locked while they
                              were stopped that the cluster keeps here: the executor applies
                              restore_steps(), then calls Core.restore_done().
          restart_watchdog    {}: the ha_watchdog companion is gone and we are not armed: start
                              a new one (Core.check_watchdog).
          fence_member        {"member", "startup_time", "argv"}: the manager powers off a
                              silent member (issue 13 item 5): run argv (bounded), then call
                              Core.fence_member_done() with its outcome.

        Ordering rules (the executor keeps them):
          1. persist_term and persist before anything another node can see: a ping answer
             or a request that shows the term, an answer that acknowledges a register, leave
             or plan.  Production executes them before it releases the lock under which the
             core produced them (Agent.persist_now); every other action may run after.
          2. The rest in list order.  An event precedes the action it explains (self_fence
             before fence, armed before clear_fence_record); a fence is the last action a
             node executes (the process ends in it).
          3. send and demote run in worker threads (they may block); their results come back
             through the core's methods under the lock, so their order is not guaranteed.
        """
        out, self.out = self.out, []
        return out

    def take_persist(self):
        """Only the persist_term and persist actions, taken out now: the caller writes them
        before it lets anyone see the core's state (ordering rule 1 of take_actions)."""
        kinds = ("persist_term", "persist")
        persist = [a for a in self.out if a["kind"] in kinds]
        if persist:
            self.out = [a for a in self.out if a["kind"] not in kinds]
        return persist

    def persist(self, name, data):
        """Ask the agent to write state_dir/NAME (atomically, fsync) if it changed.  The
        agent writes it before it answers the request that changed it."""
        if self.saved.get(name) != data:
            self.saved[name] = data
            self.out.append({"kind": "persist", "file": name, "data": data})

    def event(self, event, level, msg, **details):
        self.out.append({"kind": "event", "event": event, "level": level, "msg": msg,
                         "details": details})

    def send(self, to, peer, method, name, body, timeout, purpose, on_answer):
        """A manager's request.  purpose: a tuple naming what it is for (its first item
        goes into the action; asking() and forget() compare it); on_answer(purpose,
        status, answer, now) gets the answer (status None: no answer) through
        Core.on_response."""
        self.next_id += 1
        self.pending[self.next_id] = (purpose, on_answer)
        self.out.append({"kind": "send", "id": self.next_id, "to": to, "peer": peer,
                         "method": method, "name": name, "body": body, "timeout": timeout,
                         "purpose": purpose[0]})

    def once(self, key, level, msg, event=None, **details):
        """Log (and record) something only once per key: a state, not a repeat."""
        if key in self.said:
            return
        self.said.add(key)
        self.event(event or "note", level, msg, **details)

    def asking(self, purpose):
        """A request for this purpose is out, its answer not in yet."""
        return any(p == purpose for p, _ in self.pending.values())

    def forget(self, purpose):
        """Its answer, if it comes, changes nothing."""
        for rid in [r for r, (p, _) in self.pending.items() if p == purpose]:
            del self.pending[rid]


class Part:
    """One named part of a node's core: its own state, the node's configuration, and
    its neighbours by name (Core.__init__ links every part to every other one)."""

    def __init__(self, core):
        self.cfg, self.hostname = core.cfg, core.hostname
        self.candidates, self.is_candidate = core.candidates, core.is_candidate
        self.startup_time, self.start = core.startup_time, core.start
        self.box = core.box


class Election(Part):
    """Votes, leases and terms (SPEC §3.2): whom this candidate votes for, which terms
    it has seen and persisted, and whether this node is the manager (a majority of
    valid votes, and its term persisted by 2 voters: can_act)."""

    def __init__(self, core, now, persisted_term):
        super().__init__(core)
        self.vote = None
        # a candidate that lost its term file learns the others' terms before it votes
        self.term_known = persisted_term is not None or not core.is_candidate
        self.term_heard = set()
        self.persisted_term = persisted_term or 0
        self.max_term_seen = self.persisted_term
        self.announced = {}        # candidate -> (term, received_at) of "I am manager"
        self.max_manager_term = 0
        self.term_floor = 0        # the term we last acted with (this incarnation)
        self.was_manager = False
        self.manager_since = None
        self.view = (None, 0)       # manager_view at the last tick, and since when
        self.view_since = now
        self._votes = (None, {})    # valid_votes: (its inputs, its answer)

    def tick(self, now):
        """Terms, our vote, and whether we became or stopped being the manager.
        Returns whether we can act as the manager now."""
        self.see_term(self.max_term_seen)
        if self.is_candidate:
            self.update_vote(now)
        if self.is_manager(now):
            self.see_term(self.manager_term(now))
        manager = self.can_act(now)
        if manager:
            self.term_floor = self.manager_term(now)
        if manager and not self.was_manager:
            self.manager_since = now
            term = self.manager_term(now)
            self.max_manager_term = max(self.max_manager_term, term)
            self.box.event("manager_elected", "NOTICE",
                           f"this node is now the manager (term {term}, votes from "
                           f"{', '.join(sorted(self.valid_votes(now)))})", term=term)
        elif self.was_manager and not manager:
            self.manager_since = None
            self.box.event("manager_lost", "NOTICE",
                           "this node is no longer the manager (lost its majority of votes)")
        self.was_manager = manager
        seen = self.manager_view(now)[0]
        if seen != self.view[0]:
            self.view, self.view_since = (seen, now), now
        return manager

    def see_term(self, term):
        """Remember (and persist, before we answer anyone) the highest term we have seen.

        A later grant of ours is then above every term we acknowledged, across restarts."""
        self.max_term_seen = max(self.max_term_seen, term)
        if not self.term_known:
            return   # the term file is written once learn_term knows the highest term
        if self.max_term_seen > self.persisted_term:
            self.persisted_term = self.max_term_seen
            self.box.persist_term(self.persisted_term)

    def ping_answer(self, now):
        v = self.vote
        manager, term = self.manager_view(now)
        return {"hostname": self.hostname, "term_seen": self.persisted_term,
                "vote": v.holder if v else None,
                "vote_startup_time": v.holder_startup if v else None,
                "vote_term": v.term if v else 0,
                "vote_lease_ms": int(round(self.cfg.vote_lease * 1000)),
                "manager": manager, "term": term}

    def learn_term(self, cand, a):
        """Our term file was lost: learn the terms the other two candidates persisted
        (term_seen) before we vote.  An acting manager's term was persisted by 2 of the 3
        voters, so one of the other two holds it; then our grants are above it again."""
        self.term_heard.add(cand)
        self.max_term_seen = max(self.max_term_seen, a.term_seen)
        if self.term_heard >= set(self.candidates) - {self.hostname}:
            self.term_known = True
            self.persisted_term = max(self.persisted_term, self.max_term_seen)
            self.box.persist_term(self.persisted_term)
            self.box.event("note", "NOTICE", f"term file was lost: learnt term "
                           f"{self.persisted_term} from {', '.join(sorted(self.term_heard))}; "
                           "voting again")

    def valid_votes(self, now):
        """{voter: term} of the votes for this incarnation that are still valid here (one
        computation per time, vote and set of ping answers: a step asks several times)."""
        key = (now, self.vote, self.link.answers_seq)
        if self._votes[0] != key:
            self._votes = (key, self._valid_votes(now))
        return self._votes[1]

    def _valid_votes(self, now):
        votes = {}
        if not self.is_candidate:
            return votes
        v = self.vote
        if v is not None and v.holder == self.hostname and v.holder_startup == self.startup_time:
            votes[self.hostname] = v.term
        for c, a in self.link.answers.items():
            if c == self.hostname:
                continue  # our own vote counts from our own state, above
            lease = min(a.vote_lease, self.cfg.vote_lease)
            if (a.vote == self.hostname and a.vote_startup_time == self.startup_time
                    and now < a.sent_at + 0.9 * lease):
                votes[c] = a.vote_term
        return votes

    def is_manager(self, now):
        return len(self.valid_votes(now)) >= 2

    def manager_term(self, now, votes=None):
        """The highest term among our valid votes, never below a term we already acted
        with (a lapsed high-term vote must not lower it: candidates would refuse us).
        votes: valid_votes(now), if the caller has them already."""
        votes = self.valid_votes(now) if votes is None else votes
        return max(max(votes.values()), self.term_floor) if len(votes) >= 2 else 0

    def acting_term(self, now):
        """The term we act with if we can act (can_act), else None: one look at the votes."""
        votes = self.valid_votes(now)
        if len(votes) < 2:
            return None
        term = self.manager_term(now, votes)
        acked = [v for v in votes if (self.persisted_term if v == self.hostname
                                      else self.link.answers[v].term_seen) >= term]
        return term if len(acked) >= 2 else None

    def can_act(self, now):
        """Manager, and at least 2 of the voters have persisted our term (term_seen).

        Any later manager's majority shares one of those voters, whose later grant is
        then above our term: the terms of managers that act strictly increase."""
        return self.acting_term(now) is not None

    def manager_view(self, now):
        """(manager hostname or None, term) as this node sees it."""
        term = self.acting_term(now)
        if term is not None:
            return self.hostname, term
        best = (None, 0)
        if self.is_candidate:
            for c, (term, at) in self.announced.items():
                if now - at <= self.cfg.vote_lease and term >= best[1] and c != self.hostname:
                    best = (c, term)
        else:
            for a in self.link.answers.values():
                if a.manager is not None and now - a.sent_at <= self.cfg.vote_lease \
                        and a.term >= best[1]:
                    best = (a.manager, a.term)
        return best

    def update_vote(self, now):
        if now - self.start < self.cfg.vote_lease:
            return  # we may have voted before we restarted: let that lease run out
        if not self.term_known:
            return  # our term file was lost: no vote before learn_term
        alive = {self.hostname: self.startup_time}
        for c in self.candidates:
            m = self.table.members.get(c)
            if c != self.hostname and m is not None and \
                    now - m.last_ping <= self.cfg.survival_window:
                alive[c] = m.startup_time
        pref = min(alive, key=lambda h: (alive[h], h))
        v = self.vote
        if v is not None and v.holder == self.hostname:
            v.renewed_at = now
        if v is not None and v.holder == pref and v.holder_startup == alive[pref]:
            return
        if v is None or v.holder == self.hostname or now - v.renewed_at >= self.cfg.vote_lease:
            term = max(self.persisted_term, self.max_term_seen) + 1
            self.see_term(term)
            self.vote = Vote(pref, alive[pref], term, now)
            self.box.event("vote", "NOTICE", f"vote granted to {pref} (term {term})",
                           holder=pref, holder_startup=alive[pref], term=term)


class Membership(Part):
    """A candidate's table of members (SPEC §3.1): register, ping and leave requests,
    and the views it gives the manager (GET members).  Written to
    state_dir/members.json (the "persist" action) before an answer leaves."""

    def __init__(self, core, now, members_state):
        super().__init__(core)
        self.members = {}
        if self.is_candidate and isinstance(members_state, dict):
            for rec in members_state.get("members") or []:
                m = Member.load(rec, now)
                if m is not None:
                    self.members[m.hostname] = m
        if self.is_candidate:
            self.box.saved["members.json"] = self.data()

    def data(self):
        return {"members": [m.saved() for _, m in sorted(self.members.items())]}

    def persist(self):
        if self.is_candidate:
            self.box.persist("members.json", self.data())

    def handle_register(self, body, now):
        """POST register: (status, answer).  A new startup_time is a new incarnation."""
        if not self.is_candidate:
            return 404, {"error": "this node is not a candidate"}
        h = body["hostname"]
        old = self.members.get(h)
        if old is not None and old.startup_time == body["startup_time"]:
            # An incarnation we know already: a register delayed or replayed (within the
            # signature window), or one whose answer was lost.  It changes nothing: a
            # stale one must not make a dead member look alive again, nor reset what its
            # pings told us (armed, left, maintenance), which would veto its failure.
            return 200, {"ok": True, "hostname": self.hostname,
                         "moved_vms": self.planbook.moved_vms(h)}
        self.members[h] = Member(body, now)
        if old is None or old.startup_time != body["startup_time"]:
            self.box.event("registered", "NOTICE",
                           f"member {h} registered (startup_time {body['startup_time']}"
                           f"{', new incarnation' if old else ''})",
                           member=h, startup_time=body["startup_time"])
        self.persist()
        return 200, {"ok": True, "hostname": self.hostname, "moved_vms": self.planbook.moved_vms(h)}

    def handle_ping(self, body, now):
        """POST ping: (status, answer).  Renews our vote if it is for the sender."""
        if not self.is_candidate:
            return 404, {"error": "this node is not a candidate"}
        h = body["hostname"]
        m = self.members.get(h)
        if m is None or m.startup_time != body["startup_time"]:
            return 409, {"error": f"{h} is not registered here; register first"}
        m.last_ping = now
        m.ready, m.not_ready = clean_readiness(body)
        if self._newer(m, body):
            flags = (m.armed, m.maintenance, m.left)
            m.armed, m.maintenance = body["armed"], body["maintenance"]
            m.left = body.get("left") is True or (m.left and "left" not in body)
            if flags != (m.armed, m.maintenance, m.left):
                self.persist()
        self.election.see_term(body["term"])
        if body["manager"] and h in self.candidates:
            self.election.announced[h] = (body["term"], now)
            self.election.max_manager_term = max(self.election.max_manager_term, body["term"])
        v = self.election.vote
        if v is not None and v.holder == h and v.holder_startup == body["startup_time"]:
            v.renewed_at = now
        return 200, dict(self.election.ping_answer(now), moved_vms=self.planbook.moved_vms(h))

    @staticmethod
    def _newer(m, body):
        """True (and remembered) if body's seq is newer than the member's last applied one.
        Bodies without seq (older agents) are always applied."""
        seq = body.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return True
        if seq <= m.seq:
            return False
        m.seq = seq
        return True

    def handle_leave(self, body, now):
        """POST leave (§3.7): the member's current incarnation is never failed over.

        Ordered with its pings by `seq`: a leave that arrives after a later ping (a stop
        that was refused, then delivered late) changes nothing."""
        if not self.is_candidate:
            return 404, {"error": "this node is not a candidate"}
        m = self.members.get(body["hostname"])
        if m is None or m.startup_time != body["startup_time"]:
            return 200, {"ok": True, "known": False}
        if not self._newer(m, body):
            return 200, {"ok": True, "known": True, "stale": True}
        if not m.left:
            m.left = True
            self.box.event("left", "NOTICE",
                           f"member {m.hostname} left the cluster (orderly stop); "
                           "it is not failed over until it registers again", member=m.hostname)
            self.persist()   # written before the acknowledgement leaves
        return 200, {"ok": True, "known": True}

    def handle_fenced(self, body, now):
        """POST fenced (issue 13 item 4): the member's incarnation `startup_time` says it
        fenced, every VM destroyed and confirmed gone, no VM supervisor left, its
        production VMs locked, and that it reboots now.  Kept (and written to
        members.json before the answer) only for the incarnation we know: a confirmation
        of an earlier one (late, replayed) or of one we never saw changes nothing.  It
        replaces only the silence of SPEC §3.4's rule (Detector.failure_verdict)."""
        if not self.is_candidate:
            return 404, {"error": "this node is not a candidate"}
        h, rec = body["hostname"], body["record"]
        m = self.members.get(h)
        if m is None or m.startup_time != body["startup_time"]:
            self.box.once(("stale_fenced", h, body["startup_time"]), "INFO",
                          f"a fence confirmation from {h} for startup_time "
                          f"{body['startup_time']} is ignored: "
                          + ("not a member here" if m is None else
                             f"the incarnation known here is {m.startup_time}"), member=h)
            return 200, {"ok": True, "known": False}
        if m.left:   # a left member is never failed over: nothing to confirm
            return 200, {"ok": True, "known": True, "left": True}
        vms = [v for v in rec.get("vms") or [] if valid_vm_name(v)] \
            if isinstance(rec.get("vms"), list) else []
        if m.fence_confirmed is None:
            m.fence_confirmed = {"vms": sorted(set(vms)),
                                 "reason": str(rec.get("reason", ""))[:200]}
            self.box.event("fence_confirmed", "NOTICE",
                           f"member {h} confirmed its fence (startup_time {m.startup_time}): "
                           f"its VMs are destroyed and locked ({', '.join(vms) or 'none'}), "
                           "it reboots now", member=h, startup_time=m.startup_time,
                           vms=sorted(set(vms)), reason=m.fence_confirmed["reason"])
            self.persist()   # written before the acknowledgement leaves
            self.detector.on_fence_confirmed(now)
        return 200, {"ok": True, "known": True}

    def members_answer(self, now):
        """GET members: our table, and the failover plans we hold (for a new manager)."""
        plans = sorted(self.planbook.plans.values(), key=lambda e: (e["term"], e.get("seq", 0)))
        return {"hostname": self.hostname, "members": self.members_view(now),
                "plans": [{k: e[k] for k in PLAN_FIELDS} for e in plans[-MAX_PLANS:]],
                "book": [dict(b, froms=list(b["froms"]))
                         for _, b in sorted(self.planbook.book.items())]}

    def silence(self, m, now):
        """Seconds since member m was last heard here (since our start, SPEC §3.4)."""
        return now - max(m.last_ping, self.start)

    def members_view(self, now):
        return [{"hostname": m.hostname, "startup_time": m.startup_time,
                 "silence": round(self.silence(m, now), 3),
                 "armed": m.armed, "maintenance": m.maintenance, "left": m.left,
                 "backup_node": m.backup_node, "failover_time": m.failover_time,
                 "address": m.address, "port": m.port, "protocol": m.protocol,
                 "ready": m.ready, "not_ready": list(m.not_ready),
                 "fence_confirmed": m.fence_confirmed is not None}
                for m in sorted(self.members.values(), key=lambda m: m.hostname)]

    MEMBER_STATES = ("left", "failed", "maintenance", "unarmed", "alive")

    def member_state(self, m, now):
        """The first of MEMBER_STATES that fits member m: failed = failed by this manager,
        or silent here for at least its failover_time while armed."""
        silence = self.silence(m, now)
        if m.left:
            return "left"
        if m.hostname in self.detector.failed or m.armed and (
                m.fence_confirmed is not None or
                _is_number(m.failover_time) and silence >= m.failover_time):
            return "failed"
        if m.maintenance:
            return "maintenance"
        return "alive" if m.armed else "unarmed"

    def member_states(self, now):
        """{state: number of members}, every state of MEMBER_STATES present."""
        out = {k: 0 for k in self.MEMBER_STATES}
        for m in self.members.values():
            out[self.member_state(m, now)] += 1
        return out

    def member_list(self, now):
        """Every member as `status` shows it (a candidate's table)."""
        manager = self.election.manager_view(now)[0]
        return [{"hostname": m.hostname,
                 "role": "manager" if m.hostname == manager else
                 "candidate" if m.hostname in self.candidates else "worker",
                 "state": self.member_state(m, now), "armed": m.armed,
                 "maintenance": m.maintenance, "left": m.left, "backup_node": m.backup_node,
                 "ready": m.ready, "not_ready": list(m.not_ready),
                 "last_seen_s": round(self.silence(m, now), 3)}
                for m in sorted(self.members.values(), key=lambda m: m.hostname)]


class Link(Part):
    """This node as a member: its pings to the 3 candidates, quorum, arming, the
    survival rule and its fence (SPEC §3.3), maintenance and leave (§3.7)."""

    def __init__(self, core, maintenance):
        super().__init__(core)
        self.registered = {c: False for c in self.candidates}
        self.reach = {c: None for c in self.candidates}   # send time of last good ping
        self.answers = {}                                  # candidate -> PingAnswer
        self.answers_seq = 0                               # + 1 at each new answer
        self.arming = False        # we want to be armed (quorum + manager seen)
        self.armed = False         # ... and the watchdog has acknowledged it
        self.fenced = False        # we fence(d): nothing is accepted or started any more
        self.wd_missing = 0        # consecutive watchdog checks that found it gone
        self.left = False          # our leave was acknowledged: we stop, unprotected
        self.seq = 0               # orders our pings and leave requests (§3.7)
        self.leaving = False       # a leave request is out
        self.had_quorum = False
        self.maintenance = maintenance
        self.maintenance_asked_at = None   # `maintenance on` waiting for 2 candidates
        self.maintenance_acks = set()
        # our pings said left or maintenance (at that send time): we arm only once 2
        # candidates have answered a later ping that says neither (SPEC §3.4, §3.7)
        self.flag_at = None
        self.clear_acks = set()
        self.approach_since = None  # armed with exactly 2 candidates reachable since
        self.approach_warned = False

    LIFECYCLE = {   # this node's lifecycle (state()), most telling first; _set() logs it
        "fenced": "fencing itself: accepts and starts nothing any more; the host reboots",
        "left": "its leave was acknowledged by 2 candidates: never failed over; it stops",
        "leaving": "a leave request (stop) is out: it refuses failover starts meanwhile",
        "maintenance": "`maintenance on` acknowledged by 2 candidates: disarmed, never "
                       "failed over",
        "armed": "protected: failed over when silent for failover_time; fences itself "
                 "below 2 candidates",
        "unarmed": "waiting for quorum, a manager, its demotions, 2 views that do not say "
                   "left or maintenance, and the watchdog; not failed over",
    }

    def state(self):
        """The first state of LIFECYCLE that fits this node's flags."""
        flags = {"fenced": self.fenced, "left": self.left, "leaving": self.leaving,
                 "maintenance": self.maintenance, "armed": self.armed}
        return next((k for k in self.LIFECYCLE if flags.get(k, True)), "unarmed")

    def _set(self, **flags):
        """The one mutator of the lifecycle flags (fenced, left, leaving, maintenance,
        armed): it logs each change of state() as "state A => B"."""
        before = self.state()
        for k, v in flags.items():
            assert k in self.LIFECYCLE, k
            setattr(self, k, v)
        after = self.state()
        if after != before:
            self.box.event("state", "INFO", f"state {before} => {after}",
                           before=before, after=after)

    def quorum(self, now):
        """(quorum, the candidates reachable): logged when it changes; a `maintenance on`
        acknowledged by 2 candidates takes effect."""
        reach = self.reachable(now)
        quorum = len(reach) >= 2
        if quorum != self.had_quorum:
            if quorum:
                self.box.event("quorum", "NOTICE",
                               f"quorum: reaching candidates {', '.join(reach)}",
                               reachable=reach)
            else:
                self.box.event("quorum_lost", "WARNING",
                               f"reaching {len(reach)} of 3 candidates"
                               f"{' (' + ', '.join(reach) + ')' if reach else ''}"
                               f"{'' if self.armed else '; not armed, so nothing to do'}",
                               reachable=reach)
            self.had_quorum = quorum
        if self.maintenance_asked_at is not None and len(self.maintenance_acks) >= 2:
            self.maintenance_asked_at = None
            self._set(maintenance=True)
            self.box.event("maintenance", "NOTICE", "maintenance on (acknowledged by "
                           f"{', '.join(sorted(self.maintenance_acks))}): the node is "
                           "disarmed and will not be failed over", on=True)
        return quorum, reach

    def arm(self, now, quorum, demotions, watchdog_armed):
        """Arming (SPEC §3.3): quorum, a manager seen, no demotion to do, no 2 views
        that may say left or maintenance, and the watchdog's acknowledgement."""
        if self.flag_at is not None and self.flags_clear() and self.flag_at != math.inf:
            self.flag_at = None
            self.box.event("note", "NOTICE", "no candidate records this node as left or in "
                           f"maintenance any more (acknowledged by "
                           f"{', '.join(sorted(self.clear_acks))}): it may arm")
        if self.maintenance or self.left:
            self.arming = False
            self._set(armed=False)
        elif not self.armed:
            self.arming = quorum and self.election.manager_view(now)[0] is not None and \
                not demotions and self.flags_clear()
        if self.arming and watchdog_armed and not self.armed:
            self._set(armed=True)
            self.box.event("armed", "NOTICE", "armed: quorum reached, manager "
                           f"{self.election.manager_view(now)[0]}, watchdog acknowledged")
            self.box.action("clear_fence_record")   # the candidates have it
            self.box.action("record_running")       # theirs is the old one

    def survive(self, now, quorum, reach):
        """The survival rule (SPEC §3.3): armed and fewer than 2 candidates reached
        within survival_window: fence.  One candidate away from it: a warning."""
        self.approach_warning(now, reach)
        if self.armed and not quorum:
            self.fence(EMERG_BELOW_2, EMERG_BELOW_2, reachable=reach,
                       silence=self.silence_ages(now))

    def set_maintenance(self, on, now):
        """`maintenance on` takes effect once 2 candidates have had a ping saying so (then
        the node disarms).  `off`: our pings say so at once, but the node arms again only
        once 2 candidates have answered such a ping (flags_clear), so that it never arms
        while 2 views may still say it must not be failed over (SPEC §3.4)."""
        if on and not self.maintenance:
            self.maintenance_asked_at, self.maintenance_acks = now, set()
        elif not on:
            self.maintenance_asked_at = None
            if self.maintenance:
                self._set(maintenance=False)
                self.box.event("maintenance", "NOTICE", "maintenance off: the node arms again "
                               "once 2 candidates have acknowledged it", on=False)

    def _flagged(self):
        """Our pings say left or maintenance."""
        return self.left or self.leaving or self.maintenance or \
            self.maintenance_asked_at is not None

    def flags_clear(self):
        """True once 2 candidates have answered a ping sent after the last one that said
        left or maintenance (and we are neither): no 2 views say we may not be failed."""
        return not self._flagged() and (self.flag_at is None or len(self.clear_acks) >= 2)

    def leave_body(self):
        """A leave request; our pings say `left` from now on (a ping built between this
        and the acknowledgements must not undo the leave), until leave_refused()."""
        self._set(leaving=True)
        self.seq += 1
        self.flag_at, self.clear_acks = math.inf, set()   # the leave itself is a flag
        return {"hostname": self.hostname, "startup_time": self.startup_time, "seq": self.seq}

    def leave_result(self, acks):
        """The candidates that acknowledged our leave.  2 or more: we have left (disarmed:
        our VMs are not protected from now on; we stop).  Fewer: the leave is refused.
        Returns whether we left."""
        if len(acks) >= 2:
            self._set(left=True)
            return True
        self.leave_refused()
        return False

    def leave_refused(self):
        """A candidate may have marked us left: we arm again only once 2 candidates have
        answered a later ping (flags_clear)."""
        self._set(leaving=False)

    def register_body(self):
        c = self.cfg
        return {"hostname": self.hostname, "address": c.address, "port": c.port,
                "protocol": c.protocol, "startup_time": self.startup_time,
                "backup_node": c.backup_node, "failover_strategy": c.failover_strategy,
                "failover_time": c.failover_time, "fenced_vms": self.rejoin.fenced_vms,
                "stopped_vms": self.rejoin.stopped_vms,
                "locked_vms": self.rejoin.locked_vms}

    def ping_body(self, now):
        """Our ping.  A manager sends its term at once (voters persist it), but announces
        itself (manager: true) only once a majority has acknowledged that term."""
        self.seq += 1
        if self._flagged():
            self.flag_at, self.clear_acks = now, set()
        elif self.flag_at == math.inf:   # a leave was sent, and refused: pings from now on
            self.flag_at = now - 1e-9    # (sent at >= now) clear it
        return {"hostname": self.hostname, "startup_time": self.startup_time,
                "seq": self.seq, "left": self.left or self.leaving, "armed": self.armed,
                "maintenance": self.maintenance or self.maintenance_asked_at is not None,
                "manager": self.election.can_act(now),
                "term": self.election.manager_term(now) if self.election.is_manager(now) else
                self.election.max_manager_term, "ready": self.rejoin.ready(),
                "not_ready": self.rejoin.not_ready_reasons()}

    def outgoing(self, now):
        """This round's requests: [(candidate, "register" | "ping", body)]."""
        return [(c, "ping", self.ping_body(now)) if self.registered[c]
                else (c, "register", self.register_body()) for c in self.candidates]

    def on_register_result(self, cand, status, answer, now):
        if 200 <= (status or 0) < 300 and isinstance(answer, dict) and answer.get("ok") is True:
            self.registered[cand] = True
            self.rejoin.learn_moved(answer.get("moved_vms"))

    def on_ping_result(self, cand, sent_at, status, answer, now):
        """Record one ping outcome.  Late (> ping_timeout) or malformed answers are failures."""
        if status == 409:
            self.registered[cand] = False
            return
        if not (200 <= (status or 0) < 300) or now - sent_at > self.cfg.ping_timeout:
            return
        if check_fields(answer, PING_ANSWER_FIELDS) is not None:
            return
        self.rejoin.learn_moved(answer.get("moved_vms"))
        prev = self.answers.get(cand)
        if prev is not None and prev.sent_at > sent_at:
            return
        a = PingAnswer(answer, sent_at)
        self.answers[cand] = a
        self.answers_seq += 1
        self.reach[cand] = sent_at
        if self.maintenance_asked_at is not None and sent_at >= self.maintenance_asked_at:
            self.maintenance_acks.add(cand)  # that ping told cand we are in maintenance
        if self.flag_at is not None and sent_at > self.flag_at:
            self.clear_acks.add(cand)        # that ping told cand we are neither
        self.election.max_term_seen = max(self.election.max_term_seen, a.term, a.vote_term)
        if not self.election.term_known and cand != self.hostname:
            self.election.learn_term(cand, a)
        if a.manager is not None:
            self.election.max_manager_term = max(self.election.max_manager_term, a.term)

    def reachable(self, now):
        return [c for c in self.candidates
                if self.reach[c] is not None and now - self.reach[c] <= self.cfg.survival_window]

    def silence_ages(self, now):
        """{candidate: seconds since the send time of its last good ping, or None}."""
        return {c: None if self.reach[c] is None else round(now - self.reach[c], 3)
                for c in self.candidates}

    def survival_margin(self, now):
        """Seconds until this node would fence if it heard from no candidate any more
        (the second-newest good ping leaves the survival window); 0 without quorum."""
        left = sorted((self.reach[c] + self.cfg.survival_window - now
                       for c in self.reachable(now)), reverse=True)
        return max(0.0, left[1]) if len(left) >= 2 else 0.0

    def approach_warning(self, now, reach):
        """Issue 14 item 2: armed and one candidate away from a fence for more than
        ping_interval: one WARNING; one NOTICE when it clears.  Never decides anything."""
        close = self.armed and len(reach) == 2
        if not close:
            if self.approach_warned:
                self.box.event("fence_warning_cleared", "NOTICE",
                               f"no longer close to a self-fence: {len(reach)} of 3 candidates "
                               "reachable" + ("" if self.armed else " (not armed)"),
                               reachable=reach)
            self.approach_since, self.approach_warned = None, False
            return
        if self.approach_since is None:
            self.approach_since = now
        if not self.approach_warned and now - self.approach_since > self.cfg.ping_interval:
            self.approach_warned = True
            n = min(self.reach[c] + self.cfg.survival_window - now for c in reach)
            lost = [c for c in self.candidates if c not in reach]
            self.box.event("fence_warning", "WARNING",
                           f"approaching self-fence: 2 of 3 candidates reachable "
                           f"({', '.join(lost)} silent); fence in {max(0.0, n):.0f} s if one "
                           "more is lost", reachable=reach, silence=self.silence_ages(now))

    def fence(self, msg, why, **details):
        """Fence now (§3.3): from here on no failover is accepted or started.  msg: the
        EMERG line; why: the fence record's `reason`."""
        self.box.event("self_fence", "EMERG", msg, **details)
        self._set(fenced=True)
        self.box.action("fence", reason=why)

    def check_watchdog(self, alive, now, restarting=False, pid=None):
        """The watchdog-gone rule (§3.5), once per ping_interval: alive is what the agent
        saw of its ha_watchdog companion (a zombie is gone).  Gone for 3 consecutive
        checks: an armed node fences; an unarmed one starts a new watchdog (one at a
        time: `restarting` says one is being started).  Returns nothing: actions."""
        if self.fenced:
            return
        if alive:
            self.wd_missing = 0
            return
        self.wd_missing += 1
        if self.wd_missing < WATCHDOG_GONE_CHECKS:
            return
        if self.armed:
            self.fence(f"ha_watchdog (PID {pid}) is gone, initiating self fencing",
                       "ha_watchdog is gone", reason="ha_watchdog gone")
        elif not restarting:
            self.box.event("note", "ERROR", f"ha_watchdog (PID {pid}) is gone; node not armed, "
                           "starting a new one")
            self.box.action("restart_watchdog")

    def running_record(self, vms=None, started=(), old=()):
        """What state_dir/running.json must say now (§3.6): ("write", names),
        ("remove", None) or None (leave the file as it is).

        The record holds the production VMs this host runs as their parent, kept while we
        are armed: a host that loses power leaves no fence record, and its next agent
        sends these as `fenced_vms`, so the manager restarts those live nowhere even if
        the host is back before failover_time.  vms: a fresh inventory (the record :=
        its production VMs that are live here with parent_host = us); started: the VMs a
        failover started here since that inventory was taken (it may predate the start),
        or, without vms, the one it has just started (the record := old + it, at once:
        the next inventory may come after a power loss).  Not armed (or leaving):
        untouched, except in maintenance, which removes it (the node is not failed over)."""
        if not self.armed or self.left or self.leaving:
            return ("remove", None) if self.maintenance else None
        if vms is None:
            return "write", sorted(set(old) | set(started))
        return "write", sorted(set(running_record_names(self.hostname, vms)) | set(started))


class Rejoin(Part):
    """Back from a fence or a power loss (SPEC §3.6): the VMs the cluster moved away
    while we were gone are demoted here before we arm; and what this host can start
    (issue 11: its datasets available, Hoster initialised)."""

    def __init__(self, core, fenced_vms, stopped_vms, locked_vms=()):
        super().__init__(core)
        self.fenced_vms = list(fenced_vms)    # our fence record's VMs (register)
        self.stopped_vms = list(stopped_vms)  # ran here before an orderly stop
        # our fence record's `locked` that were not running (issue 11 item 2.2): the
        # manager gives them their parent_host back (a done plan to us) once they run
        # nowhere and no plan moves them; `restored`: those we did that to
        self.locked_vms = list(locked_vms)
        self.restored, self.restore_asked = set(), set()
        self.moved = {}            # vm -> (plan key, new parent), newest plan wins (§3.6)
        self.demoted = {}          # vm -> new parent, applied locally
        self.demote_asked = {}
        # this host's VM datasets (issue 11 item 2.1): {dataset: why unavailable} as last
        # seen (and when); demotions the agent could not do because a dataset was
        # unavailable ({vm: new parent}), and the datasets unavailable then
        self.datasets_unavailable = {}
        self.datasets_seen_at = -math.inf
        self.host_not_ready = []   # why this host cannot start any VM (item 2.3), or []
        self.demote_deferred = {}
        self.deferred_for = set()

    def tick(self):
        """Ask the agent to demote the moved VMs not demoted yet (once 2 candidates have
        answered us).  Returns them: we do not arm while any is left."""
        # a demotion deferred for an unavailable dataset is not asked for again (until
        # _retry_demotions) and does not keep us unarmed (the node may arm with a locked
        # dataset; that dataset's VMs are invisible here)
        todo = {vm: p for vm, p in self.demotion_pending().items()
                if self.demote_deferred.get(vm) != p}
        if todo and todo != self.demote_asked and sum(self.link.registered.values()) >= 2:
            self.demote_asked = dict(todo)
            # Once armed, a live copy here is ours by the cluster's own rule (we would have
            # fenced otherwise): a lagging plan must never destroy it.
            self.box.action("demote", vms=todo, keep_live=self.link.armed)
        restore = sorted(vm for vm in self.locked_vms if vm not in self.restored and
                         vm not in self.restore_asked and
                         self.moved.get(vm, (None, None))[1] == self.hostname)
        if restore:
            # the manager's done plan keeps it here: its fence lock is lifted (item 2.2)
            self.restore_asked |= set(restore)
            self.box.action("restore", vms=restore)
        return todo

    def restore_done(self, done, failed=()):
        """The agent gave these locked copies their parent_host back (or found nothing to
        do); `failed` ones are asked for again at the next step."""
        self.restored |= set(done)
        self.restore_asked -= set(failed)

    def learn_moved(self, moved):
        """moved_vms from a register or ping answer: {vm_name, new_parent, term, seq} of
        the latest plan of each VM that once left us.  Candidates may lag behind one
        another: per VM the entry of the newest plan (term, seq) wins, including one that
        moved it back to us or whose outcome is not known (new_parent None: nothing is
        done until it is).  Demotions wait until 2 candidates have answered."""
        for m in moved if isinstance(moved, list) else []:
            if not (isinstance(m, dict) and valid_vm_name(m.get("vm_name")) and
                    (m.get("new_parent") is None or valid_hostname(m.get("new_parent")))):
                continue
            key = tuple(x if isinstance(x, int) and not isinstance(x, bool) else 0
                        for x in (m.get("term"), m.get("seq")))
            old = self.moved.get(m["vm_name"])
            if old is None or key > old[0] or (key == old[0] and old[1] is None):
                self.moved[m["vm_name"]] = (key, m["new_parent"])

    def demote_done(self, vms, deferred=None, unavailable=None, seen_at=None):
        """The agent has demoted these local copies ({vm: new parent}) to backups.
        deferred: {vm: new parent} it could not demote because no copy is visible while
        datasets were unavailable (`unavailable`, {dataset: why}, as its inventory saw
        them at seen_at): retried once one of them is available (demote_retry)."""
        self.demoted.update(vms)
        for vm in vms:
            self.demote_deferred.pop(vm, None)
        if deferred:
            self.demote_deferred.update(deferred)
            self.deferred_for = set(unavailable or ())
            self.box.event("note", "NOTICE", "demotion of "
                           + ", ".join(f"{vm} (moved to {p})" for vm, p in sorted(deferred.items()))
                           + " waits: no copy is visible while dataset(s) "
                           + ", ".join(sorted(self.deferred_for)) + " are unavailable here",
                           deferred=dict(deferred))
        if unavailable is not None and seen_at is not None:
            self.set_datasets(unavailable, seen_at)
        self._retry_demotions()

    @staticmethod
    def demote_retry(deferred_for, unavailable_now):
        """Issue 11 item 2.1: demotions deferred while datasets `deferred_for` were
        unavailable are retried as soon as one of them is available again (the moved VMs'
        copies may be visible now: they must be demoted before anyone starts them)."""
        return bool(set(deferred_for) - set(unavailable_now))

    def _retry_demotions(self):
        if self.demote_deferred and self.demote_retry(self.deferred_for,
                                                      self.datasets_unavailable):
            self.box.event("note", "NOTICE", "dataset(s) available again: demoting "
                           + ", ".join(f"{vm} (moved to {p})"
                                       for vm, p in sorted(self.demote_deferred.items()))
                           + " before anything else")
            # the next tick asks for them again
            self.demote_deferred, self.demote_asked = {}, {}

    def set_datasets(self, unavailable, seen_at):
        """This host's VM datasets that are unavailable ({dataset: why}: key-locked,
        not mounted, missing), as seen at seen_at (the agent's check every ping_interval,
        and every inventory; an older observation than the last one is ignored).  Such a
        dataset's VMs are invisible: the inventory is incomplete.  Logged once per change."""
        if seen_at < self.datasets_seen_at:
            return
        self.datasets_seen_at = seen_at
        new = dict(unavailable)
        old, self.datasets_unavailable = self.datasets_unavailable, new
        for ds in sorted(set(new) - set(old)):
            self.box.event("dataset_unavailable", "WARNING",
                           f"dataset {ds} is unavailable: {new[ds]}; its VMs are invisible "
                           "here: this node is not a failover target for them, and demotions "
                           "of VMs moved away wait for it", dataset=ds, reason=new[ds])
        for ds in sorted(set(old) - set(new)):
            self.box.event("dataset_available", "NOTICE", f"dataset {ds} is available again",
                           dataset=ds)
        self._retry_demotions()

    def set_host_readiness(self, reasons):
        """Why this host cannot start VMs at all (Hoster not initialised, no vmm_dir), as
        the agent checks every ping_interval; [] when it can.  Logged once per change."""
        reasons = list(reasons)
        if reasons != self.host_not_ready:
            if reasons:
                self.box.event("not_ready", "WARNING", "this node cannot start VMs: "
                               + "; ".join(reasons) + " (it is not a failover target)",
                               not_ready=reasons)
            else:
                self.box.event("ready", "NOTICE", "this node can start VMs again (Hoster "
                               "initialised, vmm present)")
        self.host_not_ready = reasons

    def not_ready_reasons(self, dataset=None):
        """Why this node is not ready to start VMs (issue 11 item 2.3): the host's
        reasons, then one per unavailable dataset (only `dataset`'s, if given)."""
        return list(self.host_not_ready) + [
            f"dataset {ds} unavailable: {why}" for ds, why in
            sorted(self.datasets_unavailable.items()) if dataset is None or ds == dataset]

    def ready(self):
        """Ready for every VM: Hoster initialised, vmm present, every dataset available."""
        return not self.not_ready_reasons()

    def demotion_pending(self):
        """{vm: new parent} of moved VMs whose local copy is not demoted yet."""
        return {vm: p for vm, (_, p) in self.moved.items()
                if p not in (None, self.hostname) and self.demoted.get(vm) != p}


class PlanBook(Part):
    """The failover plans a candidate holds (replicated by the manager before any
    start, SPEC §3.4) and the book: per VM its latest done plan and every host a done
    plan moved it from, kept for good (where a VM last ran).  Written to
    state_dir/plans.json before an acknowledgement leaves."""

    def __init__(self, core, plans_state):
        super().__init__(core)
        self.plans = {}            # uid -> failover plan entry (replicated by the manager)
        # vm -> its latest done plan, plus "froms": every host a done plan moved it from.
        # One entry per VM, kept for good (not capped like plans): where a VM last ran
        # (SPEC §3.4).  Written to state_dir/plans.json with the plans.
        self.book = {}
        self.plans_dirty = False
        if self.is_candidate and isinstance(plans_state, dict):
            for e in plans_state.get("plans") or []:
                if check_plan_entry(e) is None:
                    self.plans[e["uid"]] = {k: e[k] for k in PLAN_FIELDS}
            for e in plans_state.get("book") or []:
                self.store_book(e)
        if self.is_candidate:
            self.box.saved["plans.json"] = self.data()
        self.plans_dirty = False

    def data(self):
        plans = sorted(self.plans.values(), key=lambda e: (e["term"], e.get("seq", 0), e["uid"]))
        return {"plans": [dict(e) for e in plans],
                "book": [dict(e, froms=list(e["froms"])) for _, e in sorted(self.book.items())]}

    def persist(self):
        if self.is_candidate and self.plans_dirty:
            self.plans_dirty = False
            self.box.persist("plans.json", self.data())

    def store_plan(self, entry):
        old = self.plans.get(entry["uid"])
        rank = {"planned": 0, "abandoned": 1, "failed": 1, "done": 2}
        if old is None or rank.get(entry["state"], 0) > rank.get(old["state"], 0):
            self.plans[entry["uid"]] = {k: entry.get(k, 0) for k in PLAN_FIELDS}
            self.plans_dirty = True
            self.book_done(entry)
        if len(self.plans) > MAX_PLANS:
            done = sorted((e["term"], e["seq"], u) for u, e in self.plans.items()
                          if e["state"] != "planned")
            for _, _, u in done[:len(self.plans) - MAX_PLANS]:
                del self.plans[u]

    def book_done(self, e):
        """A done plan goes into the book (where its VM last ran)."""
        if e["state"] == "done":
            self.store_book(dict({k: e[k] for k in PLAN_FIELDS}, froms=[e["from"]]))

    def store_book(self, b):
        """Merge one book entry (a done plan with "froms"): the newest plan (term, seq) of
        its VM wins; the hosts it was moved from accumulate."""
        froms = b.get("froms") if isinstance(b, dict) else None
        if check_plan_entry(b) is not None or b["state"] != "done" or \
                not isinstance(froms, list) or not all(valid_hostname(h) for h in froms):
            return
        old = self.book.get(b["vm"])
        new = dict({k: b[k] for k in PLAN_FIELDS}, froms=sorted(set(froms)))
        if old is not None:
            if (old["term"], old["seq"]) > (b["term"], b["seq"]):
                new = dict(old)
            new["froms"] = sorted(set(old["froms"]) | set(froms))
        if new != old:
            self.book[b["vm"]] = new
            self.plans_dirty = True

    def handle_plan(self, body, now):
        if not self.is_candidate:
            return 404, {"error": "this node is not a candidate"}
        if body["term"] < self.election.max_manager_term:
            return 409, {"error": f"stale term {body['term']} (highest seen "
                                  f"{self.election.max_manager_term})"}
        self.election.max_manager_term = body["term"]
        for e in body["entries"]:
            self.store_plan(e)
        self.persist()   # written before the acknowledgement leaves
        return 200, {"ok": True, "stored": len(body["entries"])}

    def latest_plans(self, states):
        """{vm: the newest plan (by term, seq) among those in `states`}; done plans include
        the book's (kept for good, across restarts)."""
        latest = {}
        book = list(self.book.values()) if "done" in states else []
        for e in list(self.plans.values()) + book:
            if e["state"] in states:
                old = latest.get(e["vm"])
                if old is None or (e["term"], e.get("seq", 0)) > (old["term"], old.get("seq", 0)):
                    latest[e["vm"]] = e
        return latest

    def moved_vms(self, host):
        """VMs moved away from host (§3.6): for each VM that a done plan once moved from it,
        the target of its latest plan, done or still planned, with that plan's term and seq.
        The target may be host again (the VM came back), and new_parent is None while the
        latest plan is still planned (its outcome unknown here): either way an older entry
        from a lagging candidate is void.  A plan is held by 2 candidates before any
        start, so any 2 candidates' answers include its entry."""
        latest = self.latest_plans(("done", "planned"))
        left = {e["vm"] for e in self.plans.values() if e["state"] == "done" and e["from"] == host}
        left |= {vm for vm, b in self.book.items() if host in b["froms"]}
        return [{"vm_name": vm, "new_parent": latest[vm]["to"] if latest[vm]["state"] == "done"
                 else None, "term": latest[vm]["term"], "seq": latest[vm].get("seq", 0)}
                for vm in sorted(left)]


class Detector(Part):
    """The manager's failure detection (SPEC §3.4 step 1): the other candidates' views
    (GET members), which members failed, and what needs a failover job: the sources
    (a failed member, a member back with a fence record or from an orderly stop) and
    the episodes that are settled or retried later."""

    def __init__(self, core):
        super().__init__(core)
        self.views = {}            # other candidate -> (received_at, {member: view})
        self.view_asked = {}       # candidate -> when refresh_views last asked it
        self.failed = {}           # failed member -> its startup_time
        self.settled = set()       # episodes (episode()) whose failover is done
        self.settled_seen = {}     # settled episode -> the members whose inventory it had
        self.retry_at = {}         # episode -> (next try, delay): it left a VM unplaced
        self.confirmations_seen = set()  # (member, startup_time) of confirmed fences seen

    def refresh_views(self, now):
        """Ask a candidate for its view again as soon as that view, aged by the time since
        it came, shows a member crossing its failover_time (issue 13 item 3): detection
        then waits for one round trip instead of the next round.  Only a fresh view, and
        at most every ping_interval / 4 per candidate; the answer decides
        (on_members), never the prediction."""
        limit = 2 * self.cfg.ping_interval + self.cfg.ping_timeout
        for c, (at, view) in sorted(self.views.items()):
            if now - at > limit or self.box.asking(("members", c)) or \
                    now - self.view_asked.get(c, -math.inf) < self.cfg.ping_interval / 4:
                continue
            if any(r["silence"] < r["failover_time"] <= r["silence"] + (now - at) and
                   h not in self.failed for h, r in view.items()):
                self.ask_view(c, now)

    def ask_view(self, c, now):
        self.view_asked[c] = now
        self.box.send(c, self.cfg.candidate(c), "GET", "members", None,
                      self.cfg.ping_timeout, ("members", c), self.on_members)

    def on_fence_confirmed(self, now):
        """A member confirmed its fence to us (Membership.handle_fenced): as manager, ask
        the other candidates for their views at once instead of at the next round."""
        if self.election.manager_since is None:
            return
        for c in self.candidates:
            if c != self.hostname and not self.box.asking(("members", c)):
                self.ask_view(c, now)

    def on_members(self, purpose, status, answer, now):
        if status != 200 or not isinstance(answer, dict) or \
                not isinstance(answer.get("members"), list):
            return
        view = {m["hostname"]: m for m in answer["members"]
                if check_fields(m, MEMBER_VIEW_FIELDS) is None}
        self.views[purpose[1]] = (now, view)
        confirmed = {(h, r["startup_time"]) for h, r in view.items()
                     if r.get("fence_confirmed") is True} - self.confirmations_seen
        self.confirmations_seen |= confirmed     # a new one decides at once, once
        fresh = bool(confirmed) or any(r["silence"] >= r["failover_time"] and
                                       h not in self.failed for h, r in view.items())
        plans = answer.get("plans")
        for e in plans if isinstance(plans, list) else []:
            if check_plan_entry(e) is None:
                self.planbook.store_plan(e)
        book = answer.get("book")
        for b in book if isinstance(book, list) else []:
            self.planbook.store_book(b)
        if fresh and self.election.manager_since is not None and self.election.can_act(now):
            self.manager.decide(now)   # a member may have failed: do not wait for the round

    def fresh_views(self, now):
        own = {m["hostname"]: m for m in self.table.members_view(now)}
        limit = 2 * self.cfg.ping_interval + self.cfg.ping_timeout
        return [own] + [v for at, v in self.views.values() if now - at <= limit]

    def member_reports(self, h, now):
        """[(candidate, when its view was taken, its record of member h)]: our own view
        now and every fresh view of another candidate."""
        own = [(self.hostname, now, r) for r in self.table.members_view(now)
               if r["hostname"] == h]
        limit = 2 * self.cfg.ping_interval + self.cfg.ping_timeout
        return own + [(c, at, view[h]) for c, (at, view) in sorted(self.views.items())
                      if now - at <= limit and h in view]

    def _silence_reports(self, h, now):
        """{candidate: the silence of member h it reported in its fresh view}."""
        limit = 2 * self.cfg.ping_interval + self.cfg.ping_timeout
        out = {self.hostname: round(self.table.silence(self.table.members[h], now), 3)} \
            if h in self.table.members else {}
        for c, (at, view) in sorted(self.views.items()):
            if now - at <= limit and h in view:
                out[c] = view[h]["silence"]
        return out

    @staticmethod
    def failure_verdict(reports):
        """SPEC §3.4's rule on one member's records in the fresh views: (startup_time of
        the failed incarnation, how, None), how "silent" or "fence confirmed"; or (that
        incarnation, None, why it is not failed), or (None, None, None) if nothing says so.

        Silent: 2 views report it silent for >= its failover_time, and 2 of those armed,
        not left and not in maintenance (a real leave or maintenance has 2
        acknowledgements, so it shows in any 2 views; one candidate's stale flag must not
        veto).  Fence confirmed (issue 13 item 4): a view holds the confirmation of
        incarnation I (POST fenced), 2 views report I armed, not left and not in
        maintenance, and no view reports a later incarnation: the confirmation stands in
        for the silence, and for nothing else."""
        def ok(r):
            return r["armed"] and not r["left"] and not r["maintenance"]
        silent = [r for r in reports if r["silence"] >= r["failover_time"]]
        good = [r for r in silent if ok(r)]
        if len(good) >= 2:
            return max(r["startup_time"] for r in good), "silent", None
        confirmed = [r["startup_time"] for r in reports if r.get("fence_confirmed") is True]
        if confirmed:
            st = max(confirmed)
            if sum(r["startup_time"] == st and ok(r) for r in reports) >= 2 and \
                    all(r["startup_time"] <= st for r in reports):
                return st, "fence confirmed", None
        if len(silent) < 2:
            return None, None, None
        return max(r["startup_time"] for r in silent), None, (
            "it left" if sum(r["left"] for r in silent) >= 2 else
            "it is in maintenance" if sum(r["maintenance"] for r in silent) >= 2 else
            "it was not armed" if sum(not r["armed"] for r in silent) >= 2 else
            "fewer than 2 candidates report it armed, not left and not in maintenance")

    def detect_failures(self, now):
        views = self.fresh_views(now)
        failed = {}
        for h in sorted(set().union(*views)):
            reports = [v[h] for v in views if h in v]
            st, how, why = self.failure_verdict(reports)
            if why:
                silence = next(r["silence"] for r in reports
                               if r["silence"] >= r["failover_time"])
                self.box.once(("not_failed", h, st), "NOTICE",
                              f"member {h} is silent for {silence:.0f} s, but {why}: "
                              "its VMs are not failed over", member=h)
            if how is None:
                continue
            failed[h] = st
            if self.failed.get(h) != st:
                silent = [r for r in reports if r["silence"] >= r["failover_time"]]
                said = (f"silent for >= {silent[0]['failover_time']:g} s on {len(silent)} "
                        "candidates" if how == "silent" else
                        f"its fence was confirmed (startup_time {st}); "
                        f"{sum(r['startup_time'] == st for r in reports)} candidates report it")
                self.box.event("member_failed", "NOTICE", f"member {h} failed: {said}",
                               member=h, startup_time=st, how=how,
                               silence=self._silence_reports(h, now),
                               reachable_candidates=self.link.reachable(now))
        if set(failed) - set(self.failed) and self.protector.prot is not None:
            # a protection round waiting for a member that failed would wait out its
            # inventory timeout and then judge from a cluster that no longer exists: the
            # round after the failover job counts
            self.protector.prot = None
            self.protector.protect_at = now
        self.failed = failed
        if self.manager.job is not None:
            self.manager.drop_failed(now)

    def sources(self, now):
        """{host: VM names} whose VMs may need a new home, not yet settled: a failed
        member's fence record and the VMs whose latest plan moved them to it (their copies
        elsewhere still name the previous owner), or a rejoined member's fence record."""
        sources = {}
        moved_to = {}
        for vm, e in self.planbook.latest_plans(PLAN_STATES).items():
            moved_to.setdefault(e["to"], set()).add(vm)
        stranded = {}
        for vm, h in self.stranded().items():
            stranded.setdefault(h, set()).add(vm)
        present = None
        for h, st in self.failed.items():
            ep = ("failed", h, st)
            if ep in self.settled and ep in self.settled_seen:
                # A member whose inventory that job did not have (it was down, failed or
                # unknown then) is here now: its copies may name h as their parent (a VM
                # the job could not see), so h's failover runs once more with it
                if present is None:
                    present = {x for v in self.fresh_views(now) for x, r in v.items()
                               if x not in self.failed and not r["left"]}
                if present - self.settled_seen[ep]:
                    self.settled.discard(ep)
            if ("failed", h, st) not in self.settled and \
                    self.retry_at.get(("failed", h, st), (now, 0))[0] <= now:
                sources[h] = self.fence_record(h) | moved_to.get(h, set()) | \
                    stranded.get(h, set())
        for m in self.table.members.values():
            if m.fenced_vms and m.hostname not in self.failed and \
                    ("rejoin", m.hostname, m.startup_time) not in self.settled:
                if not m.armed:  # it usually holds the newest data: let it arm first
                    self.box.once(("rejoin_wait", m.hostname, m.startup_time), "NOTICE",
                                  f"member {m.hostname} rejoined with fenced VMs "
                                  f"{', '.join(sorted(m.fenced_vms))}; placing them once it "
                                  "is armed")
                    continue
                if self.retry_at.get(self.episode(m.hostname), (now, 0))[0] <= now:
                    sources[m.hostname] = set(m.fenced_vms)
        return sources

    def stranded(self):
        """{vm: failed member} of VMs whose latest plan, a failover from that member to
        one that is not failed, was abandoned (its target said it never had it, e.g. it
        restarted).  Its failover places them again, even if no copy names the member
        any more: the target may have rewritten its copy's parent_host before its own
        fence locked it (sim-soak failover 30394), and that lock is not a stop at home
        (FailoverManager._restore)."""
        return {vm: e["from"] for vm, e in
                self.planbook.latest_plans(PLAN_STATES).items()
                if e["state"] == "abandoned" and e["from"] in self.failed and
                e["to"] not in self.failed and e["from"] != e["to"]}

    def home_source(self, now, kind):
        """(episode, {member: VMs}) for one member back with VMs that go nowhere but home,
        or None.  kind "restart": the VMs it ran before an orderly stop, to start again
        (issue 14 item 5); "restore": the VMs its fence locked while they were stopped, to
        unlock (issue 11 item 2.2).  The member is armed (so done with its demotions), not
        in maintenance, not left."""
        attr = {"restart": "stopped_vms", "restore": "locked_vms"}[kind]
        for m in sorted(self.table.members.values(), key=lambda m: m.hostname):
            ep = (kind, m.hostname, m.startup_time)
            if getattr(m, attr) and m.armed and not (m.maintenance or m.left) and \
                    m.hostname not in self.failed and ep not in self.settled and \
                    self.retry_at.get(ep, (now, 0))[0] <= now:
                return ep, {m.hostname: set(getattr(m, attr))}
        return None

    def fence_record(self, h):
        """The fence record of failed member h's failed incarnation."""
        m = self.table.members.get(h)
        return set(m.fenced_vms or []) if m and m.startup_time == self.failed.get(h) else set()

    def episode(self, h):
        """What a failover job for source h handles: its failure, or its rejoin (with a
        fence record).  Separate keys: a host back from a fence may fail again."""
        if h in self.failed:
            return ("failed", h, self.failed[h])
        m = self.table.members.get(h)
        return ("rejoin", h, m.startup_time if m else None)

    def live_members(self, now):
        """({member: a view of it} of every member neither failed nor left, {left}).
        A member has left when 2 fresh views say so (a leave takes effect with 2
        acknowledgements, so it shows in any 2 of 3 views; with fewer views, one is
        enough): a refused leave's stale flag on one candidate must not hide the
        member's VMs (they would be skipped as a left member's, for good)."""
        views = self.fresh_views(now)
        need = 2 if len(views) >= 3 else 1
        hosts, says_left = {}, {}
        for view in views:
            for h, r in view.items():
                if h not in self.failed:
                    says_left[h] = says_left.get(h, 0) + bool(r["left"])
                    if h not in hosts or hosts[h]["left"] and not r["left"]:
                        hosts[h] = r    # our own view first
        left = {h for h, n in says_left.items() if n >= need}
        return {h: r for h, r in hosts.items() if h not in left}, left

    @staticmethod
    def eligible(members):
        """{member: may it receive VMs} (SPEC §3.4 step 2)."""
        return {h: r["armed"] and not (r["maintenance"] or r["backup_node"] or r["left"])
                for h, r in members.items()}


class Protection(Part):
    """The manager's protection round (issue 14 item 1): would each production VM
    survive its host's failure?  Every few rounds, and right after a failover job."""

    def __init__(self, core, now):
        super().__init__(core)
        # {vm: vm_protection entry} from the last complete round, the round under way
        # (its inventories) and when the next one is due
        self.protection = {}
        self.prot = None
        self.protect_at = now
        self.seq = 0

    def protection_round(self, now):
        """Ask every live member for its VMs, then decide each production VM's protection."""
        self.protect_at = now + min(PROTECTION_INTERVAL, 10 * self.cfg.ping_interval)
        hosts, _ = self.detector.live_members(now)
        self.seq += 1
        self.prot = {"id": self.seq, "members": hosts, "inv": {}, "waiting": set(hosts)}
        for h, r in sorted(hosts.items()):
            self.box.send(h, r, "GET", "vms", None, INVENTORY_TIMEOUT, ("pvms", self.seq, h),
                          self._on_pvms)
        if not hosts:
            self.prot = None

    def _on_pvms(self, purpose, status, answer, now):
        p = self.prot
        if p is None or p["id"] != purpose[1]:
            return
        inv = clean_inventory(answer) if status == 200 else None
        if inv is not None:
            p["inv"][purpose[2]] = inv
        p["waiting"].discard(purpose[2])
        if p["waiting"]:
            return
        self.prot = None
        result = vm_protection(p["inv"], self.detector.eligible(p["members"]),
                               self.cfg.max_replica_age)
        for vm, r in result.items():
            was = self.protection.get(vm)
            if not r["protected"] and (was is None or was["protected"]):
                self.box.event("vm_unprotected", "WARNING",
                               f"VM {vm} is not protected: {r['protection']} (it would not come "
                               f"back if {r['host'] or 'its host'} failed)", vm_name=vm,
                               reason=r["protection"], host=r["host"],
                               replica_age_seconds=r["replica_age_seconds"])
            elif r["protected"] and was is not None and not was["protected"]:
                self.box.event("vm_protected", "NOTICE", f"VM {vm} is protected again",
                               vm_name=vm, host=r["host"],
                               replica_age_seconds=r["replica_age_seconds"])
        self.protection = result


class Job:
    """One failover job of the manager, for `sources` ({member: VMs}).

    phase: "inventory"  waiting for every live member's GET vms (`waiting`);
           "replicate"  a batch of plans (`batch`) is out to the other candidates:
                        nothing starts before one of them acknowledged it;
           "start"      POST failover to the targets (`queue`, `inflight`), at most
                        up to MAX_BATCH at once per target in one request (a batch:
                        the target runs max_parallel_starts of them at once; to a target
                        that takes no batches, max_parallel_starts plain requests), at
                        most MAX_STARTS_AT_ONCE in all, in queue order (vm_priority) for
                        each target.
    A job ends in FailoverManager._finish_job, or is dropped (the manager cannot act,
    an inventory is missing, no candidate acknowledged the plan)."""

    def __init__(self, id, sources, members, left, owners, failed, restart, episodes):
        self.id, self.sources, self.members, self.left = id, sources, members, left
        self.owners, self.failed, self.restart, self.episodes = owners, failed, restart, episodes
        self.phase = "inventory"
        self.inv = {}
        self.waiting = set(members)
        self.queue, self.inflight = [], set()
        self.unplaced = set()      # sources a VM of which found no target (tried again)
        self.waited_on = set()     # plans planned when the job planned (left to others)
        self.batch, self.plan_wait = 0, 0
        self.unacked = []          # plans replicated and not acknowledged yet
        self.adopted = set()       # members whose prefetch answer the job waits for
        self.stranded = set()      # (vm, uid) stranded when the job began


class FailoverManager(Part):
    """The manager's failover (SPEC §3.4 steps 2-4): one Job at a time; its requests
    go out as "send" actions and their answers come back through Core.on_response.
    Plans are replicated to the other candidates before any start, and every command
    carries the manager's term."""

    def __init__(self, core, now):
        super().__init__(core)
        self.job = None
        self.job_seq = 0
        self.uid_seq = 0
        self.plan_targets = {}     # uid -> next best targets (one retry)
        self.restart_uids = set()  # plans that start a VM again after an orderly stop
        self.no_batches = set()    # targets that refused a batch (an older version)
        self.next_manager_round = now
        # issue 13 item 3: {member: (asked_at, job_seq then, inventory)} asked for just
        # before another member's deadline (prefetch), and when the last round was asked
        self.prefetched = {}
        self.prefetch_asked = -math.inf
        # issue 13 item 5: (member, startup_time) -> "running", "off" or "failed": the
        # external fences this manager ran (one try per incarnation)
        self.external = {}
        self.unsent = set()        # uids abandoned before any POST failover went out (no
        #                            acknowledgement): their target cannot run the VM
        self.external_at = {}      # (member, startup_time) -> when its fence command began

    def tick(self, now, manager):
        """A round every ping_interval while we can act (views, detection, jobs); in
        between, views that may show a failure are asked for again.  Not the manager:
        whatever we were doing is dropped."""
        if not manager:
            self.job = None
            self.protector.prot, self.protector.protection = None, {}
            self.prefetched = {}
            return
        if now >= self.next_manager_round:
            self.next_manager_round = now + self.cfg.ping_interval
            self.manager_round(now)
        else:
            self.detector.refresh_views(now)
        self.prefetch(now)

    def prefetch(self, now):
        """Decide at the deadline, not after it (issue 13 item 3): while a member's silence
        in our own view is within PREFETCH_LEAD of its failover_time (before or after it),
        ask every other live member for its inventory, again every PREFETCH_LEAD / 2.  It
        is only read: nothing is planned, replicated or sent before the member is failed
        (Detector.detect_failures, on 2 views, as always).  A job that starts then uses an
        inventory asked for at most PREFETCH_LEAD ago, before any other job began, or
        waits for its answer if it is still on its way (_start_job); without one it asks,
        as before.  Bounded: the window is 2 * PREFETCH_LEAD of a member's silence, and
        one request per member is out at once."""
        if self.job is not None or now - self.prefetch_asked < PREFETCH_LEAD / 2:
            return
        near = {h for h, m in self.table.members.items()
                if m.armed and not (m.left or m.maintenance) and h not in self.detector.failed
                and _is_number(m.failover_time) and
                abs(self.table.silence(m, now) - m.failover_time) <= PREFETCH_LEAD}
        if not near:
            return
        self.prefetch_asked = now
        hosts, _ = self.detector.live_members(now)
        for h, r in sorted(hosts.items()):
            if h not in near and not any(p[:2] == ("prefetch", h)
                                         for p, _ in self.box.pending.values()):
                self.box.send(h, r, "GET", "vms", None, INVENTORY_TIMEOUT,
                              ("prefetch", h, now, self.job_seq), self._on_prefetch)

    def _on_prefetch(self, purpose, status, answer, now):
        _, h, asked_at, job_seq = purpose
        job = self.job
        if job is not None and job.id == job_seq + 1 and h in job.adopted:
            job.adopted.discard(h)    # the job waits for this answer (_start_job)
            if h in job.waiting:
                self._on_vms(("vms", job.id, h), status, answer, now)
            return
        inv = clean_inventory(answer) if status == 200 else None
        if inv is not None and job_seq == self.job_seq:
            self.prefetched[h] = (asked_at, job_seq, inv)

    def manager_round(self, now):
        t = self.cfg
        for c in self.candidates:
            if c != self.hostname and not self.box.asking(("members", c)):
                self.box.send(c, t.candidate(c), "GET", "members", None, t.ping_timeout,
                              ("members", c), self.detector.on_members)
        self.decide(now)

    def decide(self, now):
        """Failure detection and the next job, on the views at hand (every round, and
        whenever another candidate's view arrives)."""
        t = self.cfg
        self.detector.detect_failures(now)
        self._check_inherited_plans(now)
        wait = t.watchdog_timeout + t.fence_timeout + 2 * t.ping_interval
        if now - self.election.manager_since >= wait and getattr(t, "fence_commands", None):
            self.external_fences(now)
        if self.job is None and now - self.election.manager_since >= wait:
            sources = self.detector.sources(now)
            if sources:
                self._start_job(now, sources)
            else:
                again = self.detector.home_source(now, "restart") or \
                    self.detector.home_source(now, "restore")
                if again:
                    self._start_job(now, again[1], restart=again[0])
        # protection too waits until the members had time to register and arm
        if self.job is None and self.protector.prot is None and \
                now >= self.protector.protect_at and \
                now - self.election.manager_since >= wait:
            self.protector.protection_round(now)

    def external_fences(self, now):
        """Issue 13 item 5, external fencing (off without fence_commands): power off a
        member that 2 fresh views report silent for at least survival_window at the
        same incarnation, armed, not left and not in maintenance, none at a later one,
        with its command from our fence_commands.  Once per incarnation; the caller is
        past the new-manager wait (SPEC §3.2).  A member silent that long on 2
        candidates fences itself (SPEC §3.3) or is dead: the command makes sure.  Its
        success stands in for a fence confirmation (fence_member_done); its failure
        leaves the member to failover_time."""
        def ok(r):
            return r["armed"] and not r["left"] and not r["maintenance"]
        self.external = {(h, st): v for (h, st), v in self.external.items()
                         if v == "running" or h in self.table.members and
                         self.table.members[h].startup_time == st}
        views = self.detector.fresh_views(now)
        for h, m in sorted(self.table.members.items()):
            key = (h, m.startup_time)
            argv = self.cfg.fence_commands.get(h)
            if key in self.external or not argv or h in self.detector.failed or \
                    m.fence_confirmed is not None or h == self.hostname:
                continue
            reports = [v[h] for v in views if h in v]
            silent = [r for r in reports if r["startup_time"] == m.startup_time and ok(r) and
                      r["silence"] >= self.cfg.survival_window]
            if len(silent) < 2 or any(r["startup_time"] > m.startup_time for r in reports):
                continue
            # the program only: its arguments may hold the BMC's credentials
            if self.cfg.debug:
                self.external[key] = "debug"
                self.box.event("external_fence", "NOTICE",
                               f"(DEBUG) would power off member {h} with its fence command "
                               f"({argv[0]})", member=h, startup_time=m.startup_time,
                               program=argv[0], debug=True)
                continue
            self.external[key] = "running"
            self.external_at[key] = now
            self.box.event("external_fence", "NOTICE",
                           f"member {h} is silent for >= {self.cfg.survival_window:g} s on "
                           f"{len(silent)} candidates: powering it off with its fence command "
                           f"({argv[0]})", member=h, startup_time=m.startup_time,
                           program=argv[0])
            self.box.action("fence_member", member=h, startup_time=m.startup_time,
                            argv=list(argv))

    def fence_member_done(self, member, startup_time, ok, detail, now):
        """The outcome of a fence_member action: ok (the command exited 0: the member is
        off) is kept as a confirmation of that incarnation's fence in our view, and the
        failure rule's confirmed clause fails it over (Detector.failure_verdict: still 2
        views showing it armed, not left, not in maintenance); otherwise the member waits
        for its failover_time."""
        key = (member, startup_time)
        if self.external.get(key) != "running":
            return
        began = self.external_at.pop(key, now)
        self.external[key] = "off" if ok else "failed"
        m = self.table.members.get(member)
        if not ok:
            self.box.event("external_fence_failed", "ERROR",
                           f"external fence of member {member} failed ({detail}): its VMs "
                           "wait for its failover_time", member=member,
                           startup_time=startup_time, reason=detail)
            return
        if m is not None and m.startup_time != startup_time:
            # it came back meanwhile (it fenced itself and rebooted): the command has
            # now powered that incarnation off; its silence decides as usual
            self.box.event("external_fence_failed", "ERROR",
                           f"external fence of member {member} (startup_time {startup_time}) "
                           f"ended after it came back as startup_time {m.startup_time}: the "
                           "host is off again; its VMs wait for its failover_time",
                           member=member, startup_time=startup_time,
                           reason="a later incarnation")
            return
        if m is None or m.fence_confirmed is not None:
            return
        # an exit 0 is no fence if the member was heard after the command began (review
        # of issue 13, helper-17: a wrong or lying command): in our view or in a fresh
        # one of another candidate, dated by when that view came
        heard = [c for c, at, r in self.detector.member_reports(member, now)
                 if r["startup_time"] == startup_time and at - r["silence"] > began]
        if heard:
            self.box.event("external_fence_failed", "ERROR",
                           f"the fence command of member {member} exited 0, but "
                           f"{', '.join(heard)} heard it after the command began: not taken "
                           "as a fence (check the command); its VMs wait for its "
                           "failover_time", member=member,
                           startup_time=startup_time, reason="heard after the command began")
            return
        m.fence_confirmed = {"vms": [], "reason": f"external fence: {detail}"[:200]}
        self.box.event("fence_confirmed", "NOTICE",
                       f"member {member} is powered off (its fence command exited 0; "
                       f"startup_time {startup_time})", member=member,
                       startup_time=startup_time, vms=[], reason=m.fence_confirmed["reason"])
        self.table.persist()
        if self.election.manager_since is not None and self.election.can_act(now):
            self.decide(now)

    def _stranded_uids(self):
        """{(vm, uid of its abandoned latest plan)} of the stranded VMs: a VM stranded
        again (a new plan of it abandoned) is a new pair."""
        latest = self.planbook.latest_plans(PLAN_STATES)
        return {(vm, latest[vm]["uid"]) for vm in self.detector.stranded()}

    def drop_failed(self, now):
        """A member of the running job failed meanwhile: stop waiting for it.  Its
        inventory is not needed any more (it is fenced: nothing runs there), and the
        plans that target it are abandoned; its own job (next) re-places their VMs."""
        job = self.job
        gone = set(self.detector.failed) & (set(job.members) | job.waiting)
        if not gone:
            return
        for h in sorted(gone):
            job.members.pop(h, None)
            job.inv.pop(h, None)
            job.waiting.discard(h)
        lost = [u for u in job.queue + sorted(job.inflight) if self.planbook.plans[u]["to"] in gone]
        for uid in lost:
            e = self.planbook.plans[uid]
            e["state"] = "abandoned"
            self.box.event("note", "WARNING", f"plan {uid} (VM {e['vm']} -> {e['to']}) abandoned: "
                           f"{e['to']} failed; its VMs are placed by its own failover")
            self._replicate([e], None)
        job.queue = [u for u in job.queue if u not in lost]
        job.inflight -= set(lost)
        for uid, targets in self.plan_targets.items():
            self.plan_targets[uid] = [t for t in targets if t not in gone]
        for rid, (purpose, _) in list(self.box.pending.items()):
            if purpose[0] == "failover" and purpose[2] in lost or \
                    purpose[0] == "failovers" and purpose[3] in gone or \
                    purpose[0] == "vms" and purpose[2] in gone:
                del self.box.pending[rid]  # a late answer changes nothing
        if job.waiting:
            return
        if job.phase == "inventory":
            self._plan(now)        # every inventory is in: plan
        elif job.phase == "start":
            self._pump(now)        # the starts still running decide when it ends

    def _start_job(self, now, sources, restart=None):
        """A failover job for `sources` ({member: VMs}); restart: the episode of a member
        back from an orderly stop whose VMs are started on it alone."""
        hosts, left = self.detector.live_members(now)
        owners = {}   # VMs wanted only because a plan moved them to a failed source
        for h in set(sources) & set(self.detector.failed):
            for vm in sources[h] - self.detector.fence_record(h):
                b = self.planbook.book.get(vm)
                owners[vm] = {h} | {x for e in self.planbook.plans.values() if e["vm"] == vm
                                    for x in (e["from"], e["to"])} | \
                    (set(b["froms"]) | {b["to"]} if b else set())
        # inventories asked for just before the deadline (prefetch), before any other job
        # began: at most PREFETCH_LEAD old, as fresh as a slow member's answer to a job
        early = {h: inv for h, (at, seq, inv) in self.prefetched.items()
                 if h in hosts and seq == self.job_seq and now - at <= PREFETCH_LEAD}
        # ... or still on their way: the job waits for those answers
        adopted = {p[1] for p, _ in self.box.pending.values()
                   if p[0] == "prefetch" and p[1] in hosts and p[1] not in early and
                   p[3] == self.job_seq and now - p[2] <= PREFETCH_LEAD}
        self.prefetched = {}
        self.job_seq += 1
        self.job = Job(self.job_seq, sources, hosts, left, owners,
                       failed={h for h in sources if h in self.detector.failed},
                       restart=restart,
                       episodes={h: restart or self.detector.episode(h) for h in sources})
        self.job.adopted = adopted
        self.job.stranded = self._stranded_uids()
        if early or adopted:
            rest = ", ".join(sorted(set(hosts) - set(early) - adopted)) or "no other member"
            self.box.event("note", "INFO", f"failover of {', '.join(sorted(sources))}: "
                           f"inventories of {', '.join(sorted(set(early) | adopted))} asked "
                           f"for just before the deadline; asking {rest}")
        for h, r in sorted(hosts.items()):
            if h in early:
                self.job.inv[h] = early[h]
                self.job.waiting.discard(h)
            elif h not in adopted:
                self.box.send(h, r, "GET", "vms", None, INVENTORY_TIMEOUT,
                              ("vms", self.job_seq, h), self._on_vms)
        if not self.job.waiting:
            self._plan(now)

    def _on_vms(self, purpose, status, answer, now):
        job = self.job
        if job is None or job.id != purpose[1]:
            return
        h = purpose[2]
        inv = clean_inventory(answer) if status == 200 else None
        if inv is None:
            err = answer.get("error") if isinstance(answer, dict) else answer
            self.box.once(("inventory_wait", h, tuple(sorted(job.sources))), "WARNING",
                          f"failover of {', '.join(sorted(job.sources))} waits: no VM inventory "
                          f"from {h} ({status or err}); retrying every round")
            self.job = None
            return
        job.inv[h] = inv
        job.waiting.discard(h)
        if not job.waiting:
            self._plan(now)

    def _plan(self, now):
        job = self.job
        busy = {e["vm"] for e in self.planbook.plans.values() if e["state"] == "planned"}
        # the plans this job leaves to others (a check of an inherited plan, a job that
        # was dropped): one abandoned before the job ends keeps its source unsettled
        job.waited_on = {uid for uid, e in self.planbook.plans.items() if e["state"] == "planned"}
        eligible = self.detector.eligible(job.members)
        for h, inv in sorted(job.inv.items()):
            if not inv["host"]["ready"] and eligible.get(h):
                why = "; ".join(inv["host"]["not_ready"]) or "no reason given"
                self.box.once(("not_ready", h, why), "NOTICE",
                              f"member {h} is not ready to start VMs ({why}): it is no failover "
                              "target for the VMs it cannot start", member=h,
                              not_ready=inv["host"]["not_ready"])
        skipped = []
        last_ran = {vm: e["to"] for vm, e in self.planbook.latest_plans(("done",)).items()}
        # the target of a VM's latest plan that was abandoned after its start was sent
        # may run it (its agent restarted in order: review of issue 13): like last_ran,
        # one that left (not asked for its inventory) keeps the VM from being moved,
        # restarted or unlocked elsewhere
        last_ran.update({vm: e["to"] for vm, e in self.planbook.latest_plans(PLAN_STATES).items()
                         if e["state"] == "abandoned" and e["uid"] not in self.unsent and
                         e["to"] in job.left})
        if job.restart and job.restart[0] == "restore":
            return self._restore(now, busy, last_ran)
        waiting = []   # restart: VMs its host cannot start yet (not ready): tried again
        if job.restart:
            (h, vms), = job.sources.items()
            moves, unplaced = [], []
            r = job.members.get(h)   # its own VMs: a backup node takes them too
            if r is not None and r["armed"] and not (r["maintenance"] or r["left"]):
                moves = [(vm, h, [h]) for vm in
                         plan_restart(h, vms, job.inv, busy, last_ran, skipped,
                                      job.left, waiting)]
        else:
            moves, unplaced = plan_failover(job.sources, job.inv, eligible, busy,
                                            job.failed, job.left, job.owners,
                                            skipped, last_ran)
        for vm, src, reason in skipped:
            self.box.once(("skipped", vm, job.episodes[src]), "NOTICE",
                          f"VM {vm} of {src} is not " + ("started again after its orderly stop"
                                                         if job.restart else "failed over")
                          + f": {reason}")
        job.unplaced = {src for _, src, _ in unplaced} | {src for _, src, _ in waiting}
        if job.left - self.detector.live_members(now)[1]:
            # a member that had left when the job began is back (its leave was refused,
            # failover seed 38451): the VMs skipped as its are placed by the next try,
            # which asks it for its inventory too
            job.unplaced |= set(job.sources)
        for vm, src, reason in waiting:
            self.box.once(("restart_wait", vm, job.episodes[src]), "NOTICE",
                          f"VM {vm} waits to be started again on {src}: {reason}")
        for vm, src, reason in unplaced:
            self.box.once(("unplaced", vm, self.detector.episode(src)), "ERROR",
                          f"cannot fail over VM {vm} of {src}: {reason}", event="vm_start_failed",
                          vm_name=vm, from_host=src, reason=reason)
        term = self.election.manager_term(now)
        prio = getattr(self.cfg, "vm_priority", {})
        # vm_priority: higher first (a stable sort: VM name order within a priority), so
        # each target is sent its VMs in priority order (_pump keeps the queue's order)
        moves = sorted(moves, key=lambda mv: -prio.get(mv[0], 0))
        for vm, src, targets in moves:
            if self.cfg.debug:
                self.box.event("failover_planned", "NOTICE",
                               f"(DEBUG) would move VM: {vm} FROM offline parent: {src} TO: "
                               f"{targets[0]} (newest snapshot; next best: "
                               f"{', '.join(targets[1:]) or 'none'})",
                               vm_name=vm, from_host=src, to_host=targets[0], term=term, debug=True)
            else:
                job.queue.append(self._new_plan(vm, src, targets, term, now,
                                                **self._why_target(vm, targets, eligible)))
                if job.restart:
                    self.restart_uids.add(job.queue[-1])
        if self.cfg.debug or not job.queue:
            return self._finish_job(now)
        self._replicate([self.planbook.plans[u] for u in job.queue], ("plan_ack", job.id, 1))

    def _restore(self, now, busy, last_ran):
        """A restore job (issue 11 item 2.2): the VMs the member's fence locked while they
        were stopped, that run nowhere, that no plan is moving and whose copies name no
        other parent, get a done plan to the member itself; nothing is started.  The
        member learns it with moved_vms (the newest plan wins) and lifts their lock."""
        job = self.job
        (h, vms), = job.sources.items()
        busy = set(busy) | set(self.detector.stranded())   # their failover places them
        skipped, waiting, restore = [], [], []
        r = job.members.get(h)
        if r is not None and r["armed"] and not (r["maintenance"] or r["left"]):
            restore = plan_restart(h, vms, job.inv, busy, last_ran, skipped, job.left,
                                   waiting, locked=True)
        for vm, src, reason in skipped:
            self.box.once(("skipped", vm, job.episodes[src]), "NOTICE",
                          f"VM {vm} of {src} is not unlocked: {reason}")
        for vm, src, reason in waiting:
            self.box.once(("restore_wait", vm, job.episodes[src]), "NOTICE",
                          f"VM {vm} stays locked on {src} for now: {reason}")
        job.unplaced = {src for _, src, _ in waiting}
        term = self.election.manager_term(now)
        entries = []
        for vm in restore:
            if self.cfg.debug:
                self.box.event("vm_unlocked", "NOTICE", f"(DEBUG) would unlock VM {vm} on {h} "
                               "(stopped when it fenced; it runs nowhere)", vm_name=vm,
                               host=h, debug=True)
                continue
            self.uid_seq += 1
            uid = f"{self.hostname}-{self.startup_time}-{term}-{self.uid_seq}"
            e = {"vm": vm, "from": h, "to": h, "term": term, "uid": uid, "state": "done",
                 "seq": self.uid_seq}
            self.planbook.plans[uid] = e
            entries.append(e)
            self.box.event("vm_unlocked", "NOTICE", f"VM {vm} stays at home on {h}: its "
                           f"fence lock is lifted (it was stopped then, and runs nowhere; "
                           f"uid {uid}, term {term})", vm_name=vm, host=h, uid=uid, term=term)
        if entries:
            self._replicate(entries, None)
        self._finish_job(now)

    def _why_target(self, vm, targets, eligible):
        """The inputs of a placement (issue 14 item 8): every copy's newest snapshot and
        whether its host was eligible, and why the first target won."""
        inv = self.job.inv
        compared = {}
        for h in sorted(inv):
            for v in inv[h]["vms"]:
                if v["vm_name"] == vm:
                    snap = v["latest_snapshot"]
                    compared[h] = {"snapshot": snap["name"] if snap else None,
                                   "creation": snap["creation"] if snap else None,
                                   "eligible": bool(eligible.get(h)) and v["ready"],
                                   "ready": v["ready"],
                                   "free_memory": inv[h]["host"]["free_memory"]}
        best = compared.get(targets[0], {})
        return {"compared": compared,
                "why": f"newest snapshot among eligible members (creation "
                       f"{best.get('creation')}); ties: most free memory, fewest running VMs"}

    def _new_plan(self, vm, src, targets, term, now, **why):
        self.uid_seq += 1
        uid = f"{self.hostname}-{self.startup_time}-{term}-{self.uid_seq}"
        e = {"vm": vm, "from": src, "to": targets[0], "term": term, "uid": uid,
             "state": "planned", "seq": self.uid_seq}
        self.planbook.plans[uid] = e
        self.planbook.plans_dirty = True
        self.plan_targets[uid] = targets[1:]
        self.box.event("failover_planned", "NOTICE",
                       f"plan: VM {vm} of {src} -> {targets[0]} (uid {uid}, term {term})",
                       vm_name=vm, from_host=src, to_host=targets[0], uid=uid, term=term, **why)
        return uid

    def _replicate(self, entries, purpose):
        for e in entries:
            self.planbook.book_done(e)
        self.planbook.plans_dirty = True
        self.planbook.persist()   # our own copy is on disk before any other candidate's
        body = {"term": max([e["term"] for e in entries] + [self.election.max_manager_term]),
                "entries": [{k: e[k] for k in PLAN_FIELDS} for e in entries]}
        others = [c for c in self.candidates if c != self.hostname]
        if purpose is not None:   # a batch of the job: its starts wait for one ack
            job = self.job
            # ... of this batch, which carries every plan of the job not acknowledged yet
            # (an ack counts for its own batch only)
            job.unacked = [x for x in job.unacked if x["uid"] not in
                           {e["uid"] for e in entries}] + list(entries)
            body["entries"] = [{k: e[k] for k in PLAN_FIELDS} for e in job.unacked]
            job.phase, job.batch, job.plan_wait = "replicate", purpose[2], len(others)
        for c in others:
            self.box.send(c, self.cfg.candidate(c), "POST", "plan", body,
                          max(1.0, 2 * self.cfg.ping_timeout), purpose or ("plan_update",),
                          self._on_plan_ack if purpose else self._on_plan_update)

    def _on_plan_update(self, purpose, status, answer, now):
        pass  # best effort: a candidate that missed it asks the target later

    def _on_plan_ack(self, purpose, status, answer, now):
        job = self.job
        if job is None or job.id != purpose[1] or job.batch != purpose[2] or \
                job.phase != "replicate":
            return
        job.plan_wait -= 1
        if status == 200:
            job.phase, job.unacked = "start", []
            return self._pump(now)
        if job.plan_wait == 0:
            self.box.event("note", "WARNING", "no other candidate acknowledged the failover plan; "
                           "nothing is started, retrying next round")
            self.unsent = {u for u in self.unsent if u in self.planbook.plans}
            for uid in job.queue:
                self.planbook.plans[uid]["state"] = "abandoned"
                self.unsent.add(uid)
            self.planbook.plans_dirty = True
            self.job = None

    def _pump(self, now):
        job = self.job
        busy = collections.Counter(self.planbook.plans[u]["to"] for u in job.inflight)
        batches = {}    # target -> the uids it gets in one request
        ahead = {}      # target -> its starts under way before these
        i = 0
        while i < len(job.queue) and len(job.inflight) < MAX_STARTS_AT_ONCE:
            e = self.planbook.plans[job.queue[i]]
            cap = self._slots(e["to"]) if e["to"] in self.no_batches else MAX_BATCH
            if busy[e["to"]] >= cap or \
                    e["to"] not in busy and len(busy) >= MAX_START_REQUESTS:
                i += 1      # that target is full, or requests to as many targets are out
                continue
            if not self.election.can_act(now):
                self.job = None
                return
            uid = job.queue.pop(i)
            ahead.setdefault(e["to"], busy[e["to"]])
            peer = job.members.get(e["to"])
            if peer is None:  # failed since it was planned: never sent, placed again later
                e["state"] = "abandoned"
                self._replicate([e], None)
                continue
            self.box.event("note", "NOTICE",
                           f"RESTARTING VM: {e['vm']} ON: {e['to']} (it ran there before an "
                           "orderly stop)" if uid in self.restart_uids else
                           f"MOVING VM: {e['vm']} FROM offline parent: {e['from']} TO: {e['to']}")
            job.inflight.add(uid)
            busy[e["to"]] += 1
            batches.setdefault(e["to"], []).append(uid)
        for to, uids in batches.items():
            entries = [{"vm_name": e["vm"], "from_host": e["from"], "term": e["term"],
                        "uid": u} for u, e in ((u, self.planbook.plans[u]) for u in uids)]
            timeout = self.target.start_answer_timeout(self.cfg, ahead[to] + len(uids),
                                                       self._slots(to))
            if len(uids) == 1 or to in self.no_batches:   # the plain request (SPEC §3.4)
                for u, entry in zip(uids, entries):
                    self.box.send(to, job.members[to], "POST", "failover", entry, timeout,
                                  ("failover", job.id, u), self._on_failover)
            else:                  # a batch: the target starts them all at once
                self.box.send(to, job.members[to], "POST", "failover",
                              {"term": max(x["term"] for x in entries), "entries": entries},
                              timeout, ("failovers", job.id, tuple(uids), to),
                              self._on_failovers)
        if not job.queue and not job.inflight:
            self._finish_job(now)

    def _slots(self, to):
        """Target `to`'s start limit, as its GET vms said (review item 7 of issue 13: a
        limit smaller than ours would make its answers late), or our own."""
        inv = self.job.inv.get(to) if self.job else None
        return (inv and inv["host"].get("max_parallel_starts")) or self.cfg.max_parallel_starts

    def _on_failovers(self, purpose, status, answer, now):
        """The answer to a batch: each entry's result as if it had come alone, the results
        replicated together.  No answer, a 5xx or a result missing: that uid is unknown
        (asked about before anything else).  A 4xx for the whole request (a target of an
        older version: 400) started nothing: every entry is refused (placed again later),
        and that target gets one request per VM from now on."""
        results = answer.get("results") if status == 200 and isinstance(answer, dict) else None
        by_uid = {r["uid"]: r for r in results if isinstance(r, dict) and
                  isinstance(r.get("uid"), str)} if isinstance(results, list) else {}
        if status is not None and 400 <= status < 500:
            self.no_batches.add(purpose[3])
            err = answer.get("error") if isinstance(answer, dict) else answer
            answer, by_uid = {"error": f"batch refused ({status} {err})", "refused": True}, {}
        done = []
        for uid in purpose[2]:
            r = by_uid.get(uid)
            if r is not None and isinstance(r.get("status"), int):
                st, ans = r["status"], r.get("answer")
            elif status is not None and 400 <= status < 500:
                st, ans = 409, answer
            else:
                st, ans = None, None
            self._on_failover(("failover", purpose[1], uid), st, ans, now, done)
        if done:
            self._replicate(done, None)
        job = self.job
        if job is not None and job.id == purpose[1] and job.phase == "start":
            self._pump(now)

    def _on_failover(self, purpose, status, answer, now, batch=None):
        """One start's answer.  batch: a list the answered plans are added to (the caller
        replicates them and pumps); None: replicate and pump here."""
        uid = purpose[2]
        e = self.planbook.plans[uid]
        ok = status == 200 and isinstance(answer, dict) and answer.get("ok") is True
        if not ok and (status is None or status >= 500 or
                       (isinstance(answer, dict) and answer.get("live") is True)):
            # No answer or an internal error (the target may have started it), or it runs
            # there already: never start it elsewhere on that basis.  The plan stays
            # 'planned' (the VM stays busy); _check_inherited_plans asks the target about
            # this uid next round.
            self.box.event("note", "WARNING", f"no usable answer from {e['to']} about VM {e['vm']} "
                           f"(uid {uid}, {status or 'no answer'}); asking it before anything else")
            job = self.job
            if job is not None and job.id == purpose[1]:
                job.inflight.discard(uid)
                if job.phase == "start" and batch is None:
                    self._pump(now)
            return
        if ok:
            e["state"] = "done"
            self.box.event(*(("vm_restarted", "NOTICE", f"VM {e['vm']} is live on {e['to']} "
                           f"again (started after an orderly stop, uid {uid})")
                             if uid in self.restart_uids else
                             ("vm_moved", "NOTICE", f"VM {e['vm']} is live on {e['to']} "
                              f"(moved from {e['from']}, uid {uid})")),
                           vm_name=e["vm"], from_host=e["from"], to_host=e["to"], uid=uid,
                           term=e["term"])
        else:
            e["state"] = "failed"
            err = answer.get("error") if isinstance(answer, dict) else answer
            job = self.job
            targets = [t for t in self.plan_targets.pop(uid, [])
                       if job is not None and t in job.members]
            if targets and job is not None and job.id == purpose[1] and self.election.can_act(now):
                self.box.event("note", "WARNING", f"start of VM {e['vm']} on {e['to']} failed "
                               f"({status or ''} {err}); trying the next best target {targets[0]}")
                nu = self._new_plan(e["vm"], e["from"], targets[:1],
                                    self.election.manager_term(now), now)
                job.queue.append(nu)
                self._replicate([self.planbook.plans[nu]], ("plan_ack", job.id, job.batch + 1))
            else:
                self.box.event("vm_start_failed", "ERROR",
                               f"failover of VM {e['vm']} from {e['from']} failed on {e['to']}: "
                               f"{status or ''} {err}", vm_name=e["vm"], from_host=e["from"],
                               to_host=e["to"], uid=uid, reason=str(err))
                if job is not None and job.id == purpose[1] and \
                        isinstance(answer, dict) and answer.get("refused") is True:
                    # the target refused before starting anything (not armed yet, in
                    # maintenance): like a VM without a target, its source is tried
                    # again until a target takes it (a start that ran and failed is not)
                    job.unplaced.add(e["from"])
        job = self.job
        if job is not None and job.id == purpose[1]:
            job.inflight.discard(uid)
        if batch is not None:
            batch.append(e)
            return
        self._replicate([e], None)
        if job is not None and job.id == purpose[1] and job.phase == "start":
            self._pump(now)

    def _finish_job(self, now):
        """Settle the sources whose VMs are all handled.  One that left a VM without a
        target is tried again (a target may become eligible: a member arms, a member with
        a replica comes back), with a growing delay (each try asks every member for its
        inventory); it was reported once (vm_start_failed)."""
        job, self.job = self.job, None
        self.protector.protect_at = now     # VMs moved: what protects them changed
        planned = [e for e in self.planbook.plans.values() if e["state"] == "planned"]
        # ... and the VMs whose plan it left to others was abandoned meanwhile (seed
        # 13435: a job dropped when its manager could not act for a moment left its plans
        # planned; checked as inherited, they were abandoned while the next job skipped
        # their VMs as busy, and that job settled without them)
        planned += [self.planbook.plans[u] for u in job.waited_on
                    if u in self.planbook.plans and self.planbook.plans[u]["state"] == "abandoned"]
        # ... and a source a VM of which was stranded meanwhile (its plan abandoned after
        # the job took its sources: Detector.stranded; one stranded before, the job
        # handled: it may run on the plan's target, and then keeps nothing unsettled)
        stranded = self.detector.stranded()
        busy_from = {e["from"] for e in planned} | \
            {stranded[vm] for vm, _ in self._stranded_uids() - job.stranded}
        busy_vms = {e["vm"] for e in planned}
        for h, vms in job.sources.items():
            ep = job.episodes[h]
            if h in busy_from or vms & busy_vms or \
                    h in job.unplaced and not self.cfg.debug:
                delay = min(2 * self.detector.retry_at.get(ep, (0, self.cfg.ping_interval / 2))[1],
                            RETRY_MAX)
                self.detector.retry_at[ep] = (now + delay, delay)
                continue
            self.detector.settled.add(ep)
            self.detector.settled_seen[ep] = set(job.inv)
            self.detector.retry_at.pop(ep, None)

    def _check_inherited_plans(self, now):
        """Ask the target about every plan still 'planned' that no job of ours drives."""
        mine = set(self.job.queue) | set(self.job.inflight) if self.job else set()
        for uid, e in sorted(self.planbook.plans.items()):
            if e["state"] != "planned" or uid in mine:
                continue
            if e["to"] in self.detector.failed:
                # fenced: it runs nothing; its failover re-places it
                e["state"] = "abandoned"
                self.box.forget(("check", uid))
                self._replicate([e], None)
                continue
            if self.box.asking(("check", uid)):
                continue
            peer = None
            for view in self.detector.fresh_views(now):
                peer = peer or view.get(e["to"])
            if peer is None:
                continue
            self.box.send(e["to"], peer, "POST", "failover",
                          {"vm_name": e["vm"], "from_host": e["from"], "uid": uid, "check": True,
                           "term": max(e["term"], self.election.manager_term(now))},
                          max(1.0, 2 * self.cfg.ping_timeout), ("check", uid),
                          self._on_check)

    def _on_check(self, purpose, status, answer, now):
        e = self.planbook.plans.get(purpose[1])
        if e is None or e["state"] != "planned" or status != 200 or not isinstance(answer, dict):
            return
        # "starting" (the target is still confirming the start, or cleaning up after a
        # failed one) and "unknown" (it could not confirm the VM gone) keep the plan
        # planned: the VM stays busy and the target is asked again next round
        if answer.get("known") is False:
            e["state"] = "abandoned"
        elif answer.get("state") == "live":
            e["state"] = "done"
        elif answer.get("state") == "failed":
            e["state"] = "failed"
        else:
            return
        self.box.event("note", "NOTICE", f"inherited plan {e['uid']} (VM {e['vm']} -> {e['to']}): "
                       f"{e['state']}")
        self._replicate([e], None)


class FailoverTarget(Part):
    """This node as the target of a failover (SPEC §3.4, "The target applies ..."):
    POST failover, the start's outcome, and the uids it refused for good."""

    def __init__(self, core):
        super().__init__(core)
        self.failovers = {}        # uid -> {"vm_name", "state": starting|live|failed|unknown, ...}
        self.refused = set()       # uids a check found unknown here: refused for good

    @staticmethod
    def start_answer_timeout(cfg, starts=1, slots=None):
        """How long a manager waits for a target's answer to POST failover, with `starts`
        starts under way there, this request's included: a start's wait for one of the
        target's `slots` (its max_parallel_starts from GET vms; None: the manager's own)
        (start_timeout + 1 s for each round ahead of it, as a start's commands may take a
        little over start_timeout), the start (start_timeout, the VM must appear within
        it), its confirmation (start_confirm), and after a failed start the cleanup
        (bounded by fence_timeout) and the confirmation that the VM stays absent
        (start_confirm), + 10 s for the rest."""
        rounds = -(-max(1, starts) // (slots or cfg.max_parallel_starts))
        return rounds * (cfg.start_timeout + 1) + 2 * cfg.start_confirm + cfg.fence_timeout + 9

    def handle_failover(self, body, now, local, not_ready=None):
        """Decide on POST failover.  local: {"live": bool, "parent_host"} for our copy of
        the VM, or None.  not_ready: why this node cannot start this VM (Hoster not
        initialised, no vmm, its dataset unavailable; Agent.failover checks), or None:
        refused before anything touches the VM's config.

        Returns (status, answer), or ("start", entry) when the caller must start the VM
        and then call finish_failover().  entry["restore_parent"] is what the copy's
        parent_host must be set back to if the start fails (failed_start_parent; None:
        lock it)."""
        term, uid = body["term"], body["uid"]
        if self.link.fenced:
            return 409, {"error": FENCING}
        if term < self.election.max_manager_term:
            # refused: nothing was started; the manager (with its newer term, seed 6517)
            # or a newer one places the VM again
            return 409, {"error": f"stale term {term} (highest manager term seen "
                                  f"{self.election.max_manager_term})", "refused": True}
        self.election.max_manager_term = term
        known = self.failovers.get(uid)
        if body.get("check"):
            if known is None:
                self.refused.add(uid)   # "unknown" is final: a late request is refused
            return 200, dict(known or {}, uid=uid, known=known is not None)
        if uid in self.refused:
            return 409, {"error": f"uid {uid} was reported unknown here and is refused"}
        if known is not None:
            if known["state"] == "failed":
                return 409, {"error": known.get("error", "start failed"), "uid": uid}
            if known["state"] == "unknown":
                return 409, {"error": known.get("error", "start failed"), "uid": uid,
                             "live": True}
            return 200, {"ok": True, "uid": uid, "vm_name": known["vm_name"],
                         "state": known["state"]}
        name = body["vm_name"]
        if self.cfg.debug:
            return 409, {"error": "this node runs in debug mode and never starts a VM"}
        # refused: nothing was started, and this node may take it later ("refused")
        why = self.start_refusal()
        if why:
            return 409, {"error": why, "refused": True}
        if not_ready:
            return 409, {"error": f"not ready to start VM {name}: {'; '.join(not_ready)}",
                         "not_ready": list(not_ready), "refused": True}
        if local is None:
            return 409, {"error": f"no copy of VM {name} here"}
        if local["live"] or name in self.starting():
            return 409, {"error": f"VM {name} is already live here", "live": True}
        entry = {"uid": uid, "vm_name": name, "from_host": body["from_host"], "term": term,
                 "state": "starting",
                 "restore_parent": failed_start_parent(local.get("parent_host"), self.hostname,
                                                       body["from_host"])}
        self.failovers[uid] = entry
        return "start", entry

    def start_refusal(self):
        """Why this node takes no failover start now (maintenance, asked for or in
        effect; not armed; leaving), or None.  Asked when a request comes and again when
        a start queued for a slot gets it (Agent.start_commands): the operator may have
        turned maintenance on or asked to leave meanwhile."""
        if self.link.maintenance or self.link.maintenance_asked_at is not None:
            return "this node is in maintenance"
        if not self.link.armed or self.link.left or self.link.leaving:
            return "this node is not armed" + (
                " (it is leaving the cluster)" if self.link.left or self.link.leaving else "")
        return None

    def finish_failover(self, uid, ok, error, now, unknown=False, refused=False):
        """The start of `uid` ended: ok (the VM stayed live for start_confirm), or failed
        with `error` after the target stopped what it launched, restored the copy's
        parent_host and saw the VM stay absent for start_confirm.  unknown: the VM could
        not be confirmed gone: it may still run or start here, so the answer says `live`
        (the manager starts it nowhere else) and GET vms keeps listing it as starting,
        until a later cleanup confirms it gone (finish_failover again, not unknown).
        refused: the start waited for a slot and was then refused (start_refusal) before
        anything touched the VM: the answer says so, and the manager places it again."""
        e = self.failovers[uid]
        if refused:
            e["state"], e["error"] = "failed", error
            self.box.event("note", "NOTICE", f"start of VM {e['vm_name']} refused here before "
                           f"it began: {error}", vm_name=e["vm_name"], uid=uid)
            return 409, {"error": error, "uid": uid, "refused": True}
        if unknown:
            e["state"], e["error"] = "unknown", error
            self.box.event("vm_start_failed", "CRIT",
                           f"start of VM {e['vm_name']} failed here ({error}) and the VM could "
                           "not be confirmed gone: it may still run or start here; the cluster "
                           "starts it nowhere else until it is (retried every inventory; check "
                           "by hand)", vm_name=e["vm_name"], from_host=e["from_host"], uid=uid,
                           reason=error, unknown=True)
            return 409, {"error": f"{error}; not confirmed gone here", "uid": uid,
                         "live": True}
        e["state"] = "live" if ok else "failed"
        if ok:
            self.box.event("vm_started", "NOTICE", f"started VM {e['vm_name']} here (failover from "
                           f"{e['from_host']}, uid {uid})", vm_name=e["vm_name"],
                           from_host=e["from_host"], uid=uid)
            return 200, {"ok": True, "uid": uid, "vm_name": e["vm_name"], "state": "live"}
        e["error"] = error
        self.box.event("vm_start_failed", "ERROR", f"start of VM {e['vm_name']} failed here: "
                       f"{error}", vm_name=e["vm_name"], from_host=e["from_host"], uid=uid,
                       reason=error)
        return 409, {"error": error, "uid": uid}

    def starting(self):
        """VMs a failover start is under way for here, or whose failed start could not be
        confirmed gone (state unknown): GET vms lists them as live ("starting")."""
        return {e["vm_name"] for e in self.failovers.values()
                if e["state"] in ("starting", "unknown")}

    def unresolved_starts(self):
        """{uid: entry} of failed starts not confirmed gone (state unknown)."""
        return {u: dict(e) for u, e in self.failovers.items() if e["state"] == "unknown"}

    def fence_ours(self, running):
        """VMs a failover is starting here, or started here and that run (`running`):
        a fence records and locks them whatever their copy says (fence_plan's `ours`)."""
        return {e["vm_name"] for e in self.failovers.values()
                if e["state"] in ("starting", "unknown") or
                e["state"] == "live" and e["vm_name"] in running}


class Core:
    """The cluster state of one node and every decision it makes (SPEC §3.1-§3.6): a
    thin facade over the parts above, which the agent and the simulator drive alike.

    Built from a Config (hostname, candidates, timings, identity).  `startup_time`
    (wall-clock ms at process start) names this incarnation; `persisted_term` is the
    last vote term read back from state_dir/term.  Core.API lists what the facade
    hands to which part.
    """

    PARTS = {"box": Outbox, "election": Election, "table": Membership, "link": Link,
             "rejoin": Rejoin, "planbook": PlanBook, "detector": Detector,
             "protector": Protection, "manager": FailoverManager, "target": FailoverTarget}
    API = {   # part -> the methods and state the agent and the simulator use through Core
        "box": "take_actions take_persist",
        "election": "vote term_known was_manager valid_votes is_manager manager_term "
                    "can_act manager_view",
        "table": "members handle_register handle_ping handle_leave handle_fenced "
                 "members_answer member_states",
        "link": "armed arming fenced left maintenance reach outgoing on_register_result "
                "on_ping_result set_maintenance flags_clear leave_body leave_result "
                "leave_refused reachable silence_ages survival_margin check_watchdog "
                "running_record",
        "rejoin": "fenced_vms stopped_vms locked_vms demote_done restore_done set_datasets "
                  "set_host_readiness "
                  "not_ready_reasons ready demotion_pending",
        "planbook": "plans handle_plan moved_vms",
        "protector": "protection",
        "manager": "fence_member_done",
        "target": "failovers handle_failover finish_failover start_refusal starting "
                  "unresolved_starts fence_ours",
    }

    def __init__(self, cfg, startup_time, now, persisted_term=0, maintenance=False,
                 fenced_vms=(), members_state=None, plans_state=None, stopped_vms=(),
                 locked_vms=()):
        """persisted_term None: state_dir/term was lost (SPEC §3.2: no vote until the other
        two candidates' terms are known).  members_state, plans_state: the contents of
        state_dir/members.json and plans.json (the "persist" actions' data), or None."""
        self.cfg, self.hostname = cfg, cfg.hostname
        self.candidates, self.is_candidate = cfg.candidate_names, cfg.is_candidate
        self.startup_time, self.start = startup_time, now
        self.box = Outbox()
        self.election = Election(self, now, persisted_term)
        self.table = Membership(self, now, members_state)
        self.link = Link(self, maintenance)
        self.rejoin = Rejoin(self, fenced_vms, stopped_vms, locked_vms)
        self.planbook = PlanBook(self, plans_state)
        self.detector = Detector(self)
        self.protector = Protection(self, now)
        self.manager = FailoverManager(self, now)
        self.target = FailoverTarget(self)
        parts = {name: getattr(self, name) for name in self.PARTS}
        for part in parts.values():
            part.__dict__.update({k: p for k, p in parts.items() if p is not part})
        for name, part in self.API.items():   # its methods, bound (the state: properties)
            for method in part.split():
                if callable(getattr(type(parts[name]), method, None)):
                    setattr(self, method, getattr(parts[name], method))

    def tick(self, now, watchdog_armed=False):
        """Advance to `now`: one step, in this order.  watchdog_armed: the watchdog has
        acknowledged our armed state."""
        if self.link.fenced:
            return
        manager = self.election.tick(now)           # terms, our vote, manager changes
        self.manager.tick(now, manager)             # the manager's round, or drop its work
        self.planbook.persist()                     # plans on disk before anyone sees them
        quorum, reach = self.link.quorum(now)       # quorum; maintenance acknowledged
        demotions = self.rejoin.tick()              # moved VMs to demote here first
        self.link.arm(now, quorum, demotions, watchdog_armed)
        self.link.survive(now, quorum, reach)       # the survival rule: fence

    def on_response(self, rid, status, answer, now):
        """The answer to a "send" action (status None: none came) goes to the part that
        asked (Outbox.send's on_answer)."""
        request = self.box.pending.pop(rid, None)
        if request is not None:
            purpose, on_answer = request
            on_answer(purpose, status, answer, now)
            self.planbook.persist()

    def status(self, now):
        manager, term = self.election.manager_view(now)
        role = ("manager" if manager == self.hostname else
                "candidate" if self.is_candidate else "worker")
        return {"hostname": self.hostname, "role": role, "manager": manager, "term": term,
                "reachable_candidates": self.link.reachable(now), "armed": self.link.armed,
                "maintenance": self.link.maintenance, "startup_time": self.startup_time,
                "fenced": self.link.fenced, "state": self.link.state(),
                "vote": self.election.vote.holder if self.election.vote else None,
                "manager_for_s": round(now - self.election.view_since, 3) if manager else None,
                "candidate_silence": self.link.silence_ages(now),
                "survival_margin_s": round(self.link.survival_margin(now), 3),
                "approaching_fence": self.link.approach_warned,
                "datasets_unavailable": dict(self.rejoin.datasets_unavailable),
                "ready": self.rejoin.ready(), "not_ready": self.rejoin.not_ready_reasons(),
                "demotion_pending": self.rejoin.demotion_pending(),
                "members": self.table.member_list(now) if self.is_candidate else None,
                # the manager's last protection round: {vm: reason} of the unprotected
                "protection": {"checked": len(self.protector.protection),
                               "unprotected": {vm: r["protection"] for vm, r in
                                               sorted(self.protector.protection.items())
                                               if not r["protected"]}}
                if role == "manager" and self.protector.protection else None}


for _part, _names in Core.API.items():      # the parts' state, read only through Core
    for _name in _names.split():
        if not callable(getattr(Core.PARTS[_part], _name, None)):
            setattr(Core, _name, property(operator.attrgetter(f"{_part}.{_name}"),
                                          doc=f"Core.{_part}.{_name} (read only here)"))


# -----------------------------------------------------------------------------
# 2b. Host-side rules (pure)
#
# What this host does to its own VMs when it fences, rejoins or records what it
# runs: the rules that keep a production VM off two hosts.  Each takes the
# inventory (dicts with vm_name, production, parent_host, live, as Host.inventory
# returns them) and inputs, and returns a decision; the agent (fence_host,
# Agent.demote, Agent.record_running) and the simulator carry them out.
# -----------------------------------------------------------------------------

def is_locked(parent_host):
    """A parent_host written by a fence (ours or Hoster's): nothing starts that copy."""
    return isinstance(parent_host, str) and parent_host.startswith(LOCK_PREFIX)


def fence_plan(hostname, inventory, running, ours=(), old=None):
    """What a fence (§3.3 steps 2-4) records, locks and destroys.

    inventory: this host's VM copies; running: the VMs that exist in the kernel now;
    ours: VMs a failover is starting here, or started here and that run
    (Core.fence_ours; the inventory may predate their change-parent); old: the fence
    record already on disk ({"vms", "locked"}, or None): a second fencer of one
    incident (agent and watchdog both may fence) only extends it.
    Returns {"vms", "locked", "lock", "destroy"}:
      vms     the record's VMs (what rejoin may place, §3.6): the production VMs running
              here as their parent, the `ours` ones, a running copy already locked (the
              other fencer's), and the old record's;
      locked  every VM this incident locked (the record's `locked`): every production VM
              whose parent_host is this host, running or not (Hoster's own fence does the
              same: a VM the planner may move must be locked on the host it leaves), and the
              `ours` ones.  On rejoin a moved one is demoted, a placed one gets its
              parent back, and a stopped one that runs nowhere and was not moved gets it
              back from the manager's restore job (restore_steps);
      lock    the inventory entries to lock now (those not locked already);
      destroy every running VM, production or not."""
    old = old if isinstance(old, dict) else {}
    running, ours = set(running), set(ours)
    prod = [v for v in inventory if v.get("production")]
    recorded = {v["vm_name"] for v in prod if v["vm_name"] in ours or (
        v["vm_name"] in running and (v.get("parent_host") == hostname or
                                     is_locked(v.get("parent_host"))))}
    mine = [v for v in prod if v["vm_name"] in ours or v.get("parent_host") == hostname]
    lock = [v for v in mine if not is_locked(v.get("parent_host"))]
    already = {v["vm_name"] for v in prod
               if v["vm_name"] in recorded and is_locked(v.get("parent_host"))}

    def listed(key):
        return {n for n in old.get(key) or [] if valid_vm_name(n)}
    return {"vms": sorted(recorded | listed("vms")),
            "locked": sorted({v["vm_name"] for v in lock} | already | listed("locked")),
            "lock": sorted(lock, key=lambda v: v["vm_name"]),
            "destroy": sorted(running)}


def demotion_steps(local, moved, keep_live, unavailable=()):
    """§3.6: what a returning host does to its copies of VMs the cluster moved away.

    local: {vm: {"parent_host", "live"}} of this host's copies; moved: {vm: new parent};
    keep_live: we are armed, so a copy live here is ours by the cluster's own rule (we
    would have fenced otherwise): a lagging plan must never destroy it.
    Returns [(vm, new parent, step)], sorted by VM, step one of
      "absent"   no copy here: nothing to do;
      "done"     already a stopped backup of the new parent;
      "keep"     live here and keep_live: left running, reported (check by hand);
      "demote"   rewrite parent_host to the new parent;
      "destroy"  live here: destroy it, then rewrite parent_host;
      "deferred" no copy visible, but datasets are unavailable (`unavailable`: a key-locked
                 or unmounted dataset hides its VMs): not done; retried once they are
                 available (Core.demote_retry), else an operator's start-all after the
                 unlock would start a copy that still names this host.
    Every VM is handled (Core.demote_done) once its step succeeded."""
    steps = []
    for name, parent in sorted(moved.items()):
        v = local.get(name)
        if v is None:
            step = "deferred" if unavailable else "absent"
        elif v.get("parent_host") == parent and not v.get("live"):
            step = "done"
        elif v.get("live"):
            step = "keep" if keep_live else "destroy"
        else:
            step = "demote"
        steps.append((name, parent, step))
    return steps


def restore_steps(local, vms, hostname):
    """Issue 11 item 2.2: what this host does to the copies its fence locked while they
    were stopped, once the manager's done plan keeps them here (moved_vms names this
    host).  local: {vm: {"parent_host", "live"}}.  Returns [(vm, step)], sorted, step:
      "restore"  locked and not running: parent_host = this host again;
      "done"     it names this host already (the operator, or an earlier restore);
      "skip"     it runs, or names another host: left as it is (reported);
      "absent"   no copy here."""
    steps = []
    for name in sorted(vms):
        v = local.get(name)
        parent = None if v is None else v.get("parent_host")
        steps.append((name, "absent" if v is None else "done" if parent == hostname else
                      "restore" if is_locked(parent) and not v.get("live") else "skip"))
    return steps


def failed_start_parent(old_parent, hostname, from_host):
    """§3.4: the parent_host a target's copy gets back after a failed failover start
    (change-parent or cireset rewrote it to this host first): what it was before, so the
    copy is a backup (or locked) again and an operator's `hoster vm start-all` here never
    starts it while the cluster runs it elsewhere.  A copy that named this host already
    (or nothing) gets the source host; None: lock it (parent_host = __HA_LOCKED_...__),
    for a VM placed back on the host it came from."""
    if isinstance(old_parent, str) and old_parent and old_parent != hostname:
        return old_parent
    if isinstance(from_host, str) and from_host and from_host != hostname:
        return from_host
    return None


def start_verdict(now, appear_by, confirm, seen_at, vanished_at):
    """§3.4, a start is confirmed, not assumed: after `hoster vm start` returned 0, the VM
    must appear (vmm_dir/NAME) by appear_by and then stay present for `confirm` seconds.
    seen_at: when it was first seen (None: not yet); vanished_at: when it was first found
    gone again after that (None: not so far).  Returns ("wait", None), ("ok", None) or
    ("failed", why)."""
    if seen_at is not None and vanished_at is not None:
        return "failed", (f"it appeared and vanished {max(0.0, vanished_at - seen_at):.1f} s "
                          "later (bhyve died)")
    if seen_at is None:
        if now >= appear_by:
            return "failed", "it did not appear in time"
        return "wait", None
    if now - seen_at >= confirm:
        return "ok", None
    return "wait", None


def watchdog_verdict(armed, alive, since_beat, timeout, pid, newcomer=None):
    """The companion watchdog's rule (SPEC §3.5): the reason to fence the host, or None.

    armed: the agent's last heartbeat said armed; alive: its PID still runs; since_beat:
    seconds since that heartbeat; timeout: watchdog_timeout; newcomer: a PID that sent
    heartbeats in its place.  An unarmed agent that is gone fences nothing (its VMs are
    not protected: nobody fails them over)."""
    if not armed:
        return None
    if not alive:
        if newcomer is not None:
            return (f"hoster_ha (PID {pid}) is gone and PID {newcomer} took its place "
                    "while the node was armed")
        return f"hoster_ha (PID {pid}) is gone"
    if since_beat >= timeout:
        return (f"no heartbeat from hoster_ha (PID {pid}) for {since_beat:.1f} s "
                f"(watchdog_timeout {timeout:g})")
    return None


def absence_verdict(now, absent_since, confirm, give_up_at):
    """After a failed start, before the target reports the failure: the VM must stay
    absent for `confirm` seconds (absent_since: since when it has been absent without a
    break; None: present now).  Returns "wait", "confirmed" or "unknown" (not confirmed
    by give_up_at: the target must not report an ordinary failure, the VM may still run
    here)."""
    if absent_since is not None and now - absent_since >= confirm:
        return "confirmed"
    if now >= give_up_at:
        return "unknown"
    return "wait"


ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def command_text(out, err, limit=300):
    """What a command said, for a log line: the last non-empty line of its stdout and of
    its stderr (Hoster prints its errors on stdout; ANSI codes, if any, are stripped:
    HosterCore's emojlog prints none, HOSTER-FACTS says it does)."""
    parts = []
    for text in (out, err):
        lines = [ln.strip() for ln in ANSI_RE.sub("", text or "").splitlines() if ln.strip()]
        if lines and lines[-1] not in parts:
            parts.append(lines[-1])
    return " / ".join(parts)[:limit] or "no output"


def unavailable_datasets(errors):
    """{dataset: why} of the unavailable datasets among Host.inventory's errors."""
    return {e["dataset"]: e.get("reason") or e["error"] for e in errors
            if isinstance(e, dict) and e.get("unavailable")}


def dataset_states(datasets, rc, out, err):
    """{dataset: None (available) or why not} from one `zfs get -H -p -o
    name,property,value mounted,keystatus DS...` (exit status rc, stdout, stderr).  A
    dataset is available when it exists, is mounted and its key (if encrypted) is
    loaded; otherwise its VMs are invisible (HOSTER-FACTS "ZFS")."""
    props = {}
    for line in (out or "").splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            props.setdefault(parts[0], {})[parts[1]] = parts[2]
    errs = [ln.strip() for ln in (err or "").splitlines() if ln.strip()]
    states = {}
    for ds in datasets:
        p = props.get(ds)
        if p is None:
            said = next((e for e in errs if f"'{ds}'" in e), None)
            states[ds] = ("missing: " + said if said and "does not exist" in said else
                          f"zfs get failed (exit {rc}): {said or last_line(err or '') or 'no output'}")
        elif p.get("keystatus") == "unavailable":
            states[ds] = "locked (keystatus unavailable): zfs mount -a -l"
        elif p.get("mounted") != "yes":
            states[ds] = f"not mounted (mounted {p.get('mounted', 'unknown')}): zfs mount -a"
        else:
            states[ds] = None
    return states


def running_record_names(hostname, inventory):
    """The running record's VMs (Core.running_record): production, live here, and
    this host is their parent."""
    return sorted(v["vm_name"] for v in inventory if v.get("production") and v.get("live")
                  and v.get("parent_host") == hostname)


# =============================================================================
# 3. Host: commands, VM inventory, vm_config.json, fencing
# =============================================================================

NOTICE = 25
CRIT = logging.CRITICAL   # syslog crit
ALERT = 55                # syslog alert
EMERG = 60                # syslog emerg: a wall message, for the fence line alone
logging.addLevelName(NOTICE, "NOTICE")
logging.addLevelName(ALERT, "ALERT")
logging.addLevelName(EMERG, "EMERG")
# events counted for /metrics (Agent.execute) and the ones handed to commands.notify
EVENT_COUNTERS = {"member_failed": "fences", "self_fence": "fences",
                  "watchdog_fence": "fences", "vm_started": "vm_starts_ok",
                  "vm_start_failed": "vm_starts_failed"}
NOTIFY_EVENTS = {"self_fence", "member_failed", "vm_moved", "vm_start_failed", "quorum_lost",
                 "manager_elected", "fence_warning", "vm_unprotected", "external_fence",
                 "external_fence_failed"}
EVENT_NAMES = {"registered", "manager_elected", "manager_lost", "armed", "quorum_lost",
               "self_fence", "watchdog_fence", "member_failed", "failover_planned",
               "vm_started", "vm_start_failed", "rejoin_demoted", "left", "terminated",
               "vm_moved", "fence_warning", "fence_warning_cleared", "vm_unprotected",
               "vm_protected", "vm_restarted", "vm_unlocked", "dataset_unavailable",
               "dataset_available",
               "not_ready", "ready", "fence_confirmed", "external_fence",
               "external_fence_failed"}


def run_cmd(argv, timeout):
    """Run argv (never a shell).  Returns (exit status or None on timeout, stdout, stderr).

    Bounded: on timeout the command is killed and waited for at most 1 s more; one that
    will not die (stuck in the kernel: a suspended pool) or whose children keep its
    output open is left behind, so no caller (a fence) waits for it for ever."""
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, close_fds=True)
    except OSError as e:
        return 127, "", f"{argv[0]}: {e.strerror}"
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            p.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            for f in (p.stdout, p.stderr):
                try:
                    f.close()
                except OSError:
                    pass
        return None, "", f"timed out after {timeout:g} s"
    return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def last_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def write_atomic(path, data, mode=None):
    """Write bytes to path via a temp file in the same folder, fsync, rename, fsync folder.

    Keeps the mode and owner of an existing file (or uses `mode` for a new one)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}."
                               f"{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if st is not None:
            os.chmod(tmp, st.st_mode & 0o7777)
            try:
                os.chown(tmp, st.st_uid, st.st_gid)
            except PermissionError:
                pass
        elif mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def is_production(vm_cfg):
    return vm_cfg.get("production") is True or vm_cfg.get("live_status") in ("production", "prod")


def lock_name(wall):
    return LOCK_PREFIX + time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(wall)) + "__"


class Host:
    """This host's VMs and the commands that act on them (SPEC §4.4)."""

    CMD_TIMEOUT = 30

    def __init__(self, cfg, log):
        self.cfg = cfg
        self.log = log

    def running_vms(self):
        """Names of bhyve VMs that exist in the kernel (entries of vmm_dir)."""
        try:
            return sorted(n for n in os.listdir(self.cfg.vmm_dir) if valid_vm_name(n))
        except FileNotFoundError:
            return []

    def dataset_states(self, timeout=CMD_TIMEOUT):
        """{dataset: None or why it is unavailable} for every configured VM dataset: one
        `zfs get` for all of them (pure dataset_states() reads its output)."""
        ds = list(self.cfg.vm_datasets)
        if not ds:
            return {}
        rc, out, err = run_cmd(self.cfg.commands["zfs"] + [
            "get", "-H", "-p", "-o", "name,property,value", "mounted,keystatus"] + ds, timeout)
        return dataset_states(ds, rc, out, err)

    def inventory(self, timeout=CMD_TIMEOUT, snapshots=True, budget=None):
        """[{vm_name, dataset, vm_dataset, config_path, production, parent_host, memory,
        live, latest_snapshot}] plus [{vm_name or dataset, error}]; never raises.

        A VM dataset that is unavailable (key-locked, unmounted, missing: dataset_states)
        is not listed; its error entry has "unavailable": True (the inventory is
        incomplete).  zfs calls: one `zfs get` plus, per available dataset, one `zfs
        list` of its VM filesystems and (snapshots=True) one of its snapshots: constant in
        the number of VMs; the lists run at once, after the `zfs get`.  timeout bounds each
        command; budget (s), if given, the whole inventory.  snapshots=False skips the
        snapshot lists (only a failover plan and `vms` need them: GET vms)."""
        zfs = self.cfg.commands["zfs"]
        vms, errors = [], []
        live = set(self.running_vms())
        deadline = None if budget is None else time.monotonic() + budget

        def limit():
            return timeout if deadline is None else \
                max(0.1, min(timeout, deadline - time.monotonic()))
        states = self.dataset_states(limit())
        lists = {}   # (dataset, what) -> argv: every list of every available dataset
        for ds in self.cfg.vm_datasets:
            if states.get(ds) is None:
                lists[ds, "fs"] = zfs + ["list", "-H", "-p", "-o", "name,mountpoint",
                                         "-t", "filesystem", "-d", "1", ds]
                if snapshots:
                    lists[ds, "snap"] = zfs + ["list", "-H", "-p", "-t", "snapshot", "-o",
                                               "name,creation,guid", "-s", "creation", "-r",
                                               ds]
        t = limit()
        try:
            with concurrent.futures.ThreadPoolExecutor(
                    max(1, len(lists)), thread_name_prefix="ha-zfs") as ex:
                done = {k: ex.submit(run_cmd, argv, t) for k, argv in lists.items()}
                done = {k: f.result() for k, f in done.items()}
        except RuntimeError:    # no thread to be had (a fence on a starved host): in turn
            done = {k: run_cmd(argv, limit()) for k, argv in lists.items()}
        for ds in self.cfg.vm_datasets:
            if states.get(ds) is not None:
                errors.append({"dataset": ds, "error": f"unavailable: {states[ds]}",
                               "unavailable": True, "reason": states[ds]})
                continue
            rc, out, err = done[ds, "fs"]
            if rc != 0:
                errors.append({"dataset": ds, "error": f"zfs list failed ({rc}): {last_line(err)}"})
                continue
            rc, snap_out, err = done.get((ds, "snap"), (0, "", ""))
            snaps = {}
            if rc != 0:
                errors.append({"dataset": ds, "error": f"zfs snapshot list failed ({rc}): "
                                                       f"{last_line(err)}"})
            else:
                for line in snap_out.splitlines():
                    parts = line.split("\t")
                    if len(parts) != 3 or "@" not in parts[0] or not parts[1].isdigit():
                        continue
                    fs, snap = parts[0].split("@", 1)
                    snaps[fs] = {"name": snap, "creation": int(parts[1]), "guid": parts[2]}
            for line in out.splitlines():
                parts = line.split("\t")
                if len(parts) != 2 or parts[0] == ds or not parts[0].startswith(ds + "/"):
                    continue
                name, mnt = parts[0].rsplit("/", 1)[1], parts[1]
                path = os.path.join(mnt, "vm_config.json")
                if not mnt.startswith("/") or not os.path.exists(path):
                    continue
                if not valid_vm_name(name):
                    errors.append({"vm_name": name[:80], "error": "invalid VM name"})
                    continue
                try:
                    with open(path, "rb") as f:
                        vm_cfg = json.loads(f.read().decode("utf-8"))
                    if not isinstance(vm_cfg, dict):
                        raise ValueError("not a JSON object")
                except (OSError, ValueError, RecursionError) as e:
                    errors.append({"vm_name": name, "error": f"{path}: {e}"})
                    continue
                vms.append({"vm_name": name, "dataset": parts[0], "vm_dataset": ds,
                            "config_path": path,
                            "production": is_production(vm_cfg),
                            "parent_host": vm_cfg.get("parent_host"),
                            "memory": vm_cfg.get("memory"), "live": name in live,
                            "failover_strategy": vm_cfg.get("failover_strategy"),
                            "latest_snapshot": snaps.get(parts[0])})
        return vms, errors

    def free_memory(self):
        """Free memory in bytes (product of the free_memory command's lines), or None."""
        rc, out, _ = run_cmd(self.cfg.command("free_memory"), 10)
        nums = out.split()
        if rc != 0 or len(nums) != 2 or not all(n.isdigit() for n in nums):
            return None
        return int(nums[0]) * int(nums[1])

    def set_parent(self, path, parent):
        """Atomically rewrite parent_host in a vm_config.json, keeping every other key."""
        with open(path, "rb") as f:
            vm_cfg = json.loads(f.read().decode("utf-8"))
        if not isinstance(vm_cfg, dict):
            raise ValueError(f"{path}: not a JSON object")
        vm_cfg["parent_host"] = parent
        write_atomic(path, (json.dumps(vm_cfg, indent=2) + "\n").encode("utf-8"))

    def kill_supervisors(self, names, timeout):
        """SIGKILL Hoster's VM supervisors of VMs `names` (commands.vm_kill_supervisor with
        the names as one alternation): none may start a VM again.  Returns pkill's exit
        status: 0 one ran (and was killed), 1 none ran, else the command failed."""
        if not names:
            return 1
        pattern = "(" + "|".join(sorted(set(names))) + ")"
        argv = self.cfg.command("vm_kill_supervisor", pattern)
        rc, out, err = run_cmd(argv, timeout)
        if rc not in (0, 1):
            self.log.log(ALERT, f"{' '.join(argv)[:200]} failed ({rc}): {command_text(out, err)}")
        return rc

    def destroy_all(self, names, timeout):
        """Destroy VMs in parallel; True when every vmm entry is gone within timeout."""
        deadline = time.monotonic() + timeout
        if names:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(names))) as ex:
                futs = {ex.submit(run_cmd, self.cfg.command("vm_destroy", n), timeout): n
                        for n in names}
                for fut in concurrent.futures.as_completed(futs):
                    rc, _, err = fut.result()
                    if rc != 0:
                        self.log.log(ALERT, f"destroy of VM {futs[fut]} failed ({rc}): "
                                            f"{last_line(err)}")
        while True:
            left = [n for n in names if os.path.exists(os.path.join(self.cfg.vmm_dir, n))]
            if not left or time.monotonic() >= deadline:
                return not left
            time.sleep(0.1)


# watchdog(4): WDIOCPATPAT = _IOW('W', 42, u_int); the argument is WD_ACTIVE | N, where the
# timeout is 2**N nanoseconds; 0 disarms.  Closing the device does not disarm.
WDIOCPATPAT = 0x8004572A
WD_ACTIVE = 0x8000000
FIDO = "/dev/fido"
WATCHDOGD_PID = "watchdogd.pid"  # in run_dir: watchdogd(8) writes /var/run/watchdogd.pid


def patpat_arg(n):
    """The ioctl argument that arms (or pats) watchdog(4) for 2**n ns; 0 disarms."""
    return struct.pack("I", (WD_ACTIVE | n) if n else 0)


def freebsd_major(release=None):
    release = platform.release() if release is None else release
    try:
        return int(release.split(".")[0])
    except ValueError:
        return 0


class KernelWatchdog:
    """FreeBSD watchdog(4), armed while the node is armed and patted on every heartbeat.

    FreeBSD 15 replaced WDIOCPATPAT; there the watchdog(8) command does the work.  The
    device, ioctl, command runner and watchdogd(8)'s pid file are parameters so the
    encoding and the checks can be tested without a real /dev/fido."""

    def __init__(self, watchdog_timeout, log, device=FIDO, ioctl=None, opener=os.open,
                 release=None, run=run_cmd, watchdogd_pidfile="/var/run/" + WATCHDOGD_PID):
        self.n, self.seconds = kernel_watchdog_seconds(watchdog_timeout)
        self.whole = math.ceil(watchdog_timeout + 5)  # watchdog(8) -t takes whole seconds
        self.log, self.device, self.run = log, device, run
        self.watchdogd_pidfile = watchdogd_pidfile
        self.use_command = freebsd_major(release) >= 15
        if ioctl is None:
            import fcntl
            ioctl = fcntl.ioctl
        self.ioctl, self.opener = ioctl, opener
        self.fd = None
        self.armed = False

    def check(self):
        """Raise RuntimeError (one clear line) if watchdog(4) cannot be used here.

        watchdogd(8) must not run (it pats the device with its own timeout, overriding
        ours); then the device is armed once with our timeout, by the mechanism pat()
        uses (the ioctl, or watchdog(8) on FreeBSD 15), and disarmed at once: /dev/fido
        exists whenever the watchdog module is loaded, even with no driver, and only
        arming tells (EOPNOTSUPP)."""
        other = read_pid(self.watchdogd_pidfile)
        if other is not None:
            raise RuntimeError(
                f"kernel_watchdog is on but watchdogd(8) runs (PID {other}, "
                f"{self.watchdogd_pidfile}): it pats {self.device} with its own timeout and "
                "overrides ours; stop it (service watchdogd stop; sysrc watchdogd_enable=NO) "
                "or set kernel_watchdog to false")
        if not os.path.exists(self.device):
            raise RuntimeError(f"kernel_watchdog is on but {self.device} does not exist (no "
                               "watchdog(4) driver: load ichwd, amdsbwd or ipmi)")
        try:
            self._set(self.n)
        except OSError as e:
            raise RuntimeError(self._refusal(e))
        error = None
        for _ in range(3):  # armed now: it must not stay armed while we refuse to start
            try:
                self._set(0)
                return
            except OSError as e:
                error = e
        raise RuntimeError(f"kernel watchdog {self.device} was armed for a test and could not "
                           f"be disarmed ({error}): the host may reset in {self.seconds:g} s")

    def _refusal(self, e):
        how = "/usr/sbin/watchdog -t" if self.use_command else "WDIOCPATPAT"
        if getattr(e, "errno", None) == errno.EOPNOTSUPP or "not supported" in str(e):
            return (f"kernel_watchdog is on but watchdog(4) has no driver on this host ({how} "
                    f"on {self.device}: Operation not supported): load one (kldload ichwd, "
                    "amdsbwd or ipmi) or set kernel_watchdog to false")
        return (f"kernel_watchdog is on but the kernel watchdog cannot be armed ({how} on "
                f"{self.device}: {e}); set kernel_watchdog to false if this host has none")

    def _set(self, n):
        if self.use_command:
            rc, _, err = self.run(["/usr/sbin/watchdog", "-t", str(self.whole) if n else "0"], 5)
            if rc != 0:
                raise OSError(f"/usr/sbin/watchdog failed ({rc}): {last_line(err)}")
            return
        if self.fd is None:
            self.fd = self.opener(self.device, os.O_RDWR)
        self.ioctl(self.fd, WDIOCPATPAT, patpat_arg(n))

    def pat(self):
        """Arm (first call) or pat the kernel watchdog."""
        self._set(self.n)
        if not self.armed:
            self.armed = True
            self.log.log(NOTICE, f"kernel watchdog armed: {self.device}, "
                                    f"{self.seconds:g} s (2**{self.n} ns)")

    def disarm(self):
        if self.armed:
            self._set(0)
            self.armed = False
            self.log.log(NOTICE, "kernel watchdog disarmed")


def fence_host(cfg, host, log, reason, debug, cache=None, ours=(), incarnation=None):
    """SPEC §3.3 steps 2-4: fence record + locks, destroy every VM, reboot.

    Carries out fence_plan() (which says what is recorded and locked) on a fresh
    inventory (bounded by fence_timeout / 4), else on `cache` (the caller's last one);
    `ours` as in fence_plan.  The record is written first (an existing one, the other
    fencer's, is extended, never shrunk), then the locks, then every VM is destroyed;
    a VM that appears meanwhile (a start under way) is destroyed too.  If a zfs command
    of the inventory failed, it is asked again once the VMs are gone, until it answers
    (for at most max(fence_timeout, 2 s) more), and what it finds is recorded and locked
    before the reboot.  Hoster's VM supervisors of every VM are killed before the
    destroys, so none starts its VM again.

    incarnation: the startup_time of the agent that was armed here, if the fence may be
    confirmed (issue 13 item 4).  It is confirmed (POST fenced to every candidate) only
    when every VM is gone, no supervisor remains, the inventory was complete and the
    record and every lock are written; then the host reboots with reboot_now at once.
    Only the reboot line is EMERG (a wall message); a lock or record that failed is CRIT,
    a destroy that failed ALERT.  In debug mode every step is logged as "(DEBUG) would
    ..." and nothing is changed.  Returns after the reboot command (a real reboot never
    returns)."""
    t0 = time.monotonic()
    problems = []   # why this fence cannot be confirmed
    ran = host.running_vms()
    inventory, errors = host.inventory(snapshots=False, budget=max(1.0, cfg.fence_timeout / 4))
    if cache and (errors or not inventory):
        fresh = {v["vm_name"] for v in inventory}
        inventory = inventory + [v for v in cache if v["vm_name"] not in fresh]
    fence_path = os.path.join(cfg.state_dir, "fence.json")
    say = "(DEBUG) would " if debug else ""
    stamp = lock_name(time.time())

    def record_and_lock(inventory, old):
        plan = fence_plan(cfg.hostname, inventory, ran, ours, old)
        record = {"ts": time.time(), "reason": reason, "vms": plan["vms"],
                  "locked": plan["locked"]}
        log.log(NOTICE, f"{say}write fence record {fence_path}: production VMs "
                        f"{plan['vms'] or 'none'}, locked {plan['locked'] or 'none'}")
        if not debug:
            try:
                os.makedirs(cfg.state_dir, exist_ok=True)
                write_atomic(fence_path, (json.dumps(record) + "\n").encode(), mode=0o600)
            except OSError as e:
                log.log(CRIT, f"cannot write fence record {fence_path}: {e}")
                problems.append("the fence record could not be written")
        for v in plan["lock"]:
            log.log(NOTICE, f"{say}lock VM {v['vm_name']}: parent_host = {stamp}")
            if not debug:
                try:
                    host.set_parent(v["config_path"], stamp)
                except (OSError, ValueError) as e:
                    log.log(CRIT, f"cannot lock VM {v['vm_name']}: {e}")
                    problems.append(f"VM {v['vm_name']} could not be locked")
        return plan, record
    plan, record = record_and_lock(inventory, read_fence_file(fence_path))
    running = plan["destroy"]
    known = sorted(set(running) | {v["vm_name"] for v in inventory})
    if known:
        log.log(NOTICE, f"{say}stop the VM supervisors of {', '.join(known)}")
        if not debug and host.kill_supervisors(known, max(1.0, cfg.fence_timeout / 4)) \
                not in (0, 1):
            problems.append("the VM supervisors could not be stopped")
    for n in running:
        log.log(NOTICE, f"{say}destroy VM {n}: {' '.join(cfg.command('vm_destroy', n))}")
    gone = True
    while not debug:  # until none is left: a start that was under way may still finish
        gone = host.destroy_all(running, max(1.0, cfg.fence_timeout - (time.monotonic() - t0)))
        late = sorted(set(host.running_vms()) - set(running))
        if not late or time.monotonic() - t0 >= cfg.fence_timeout:
            gone = gone and not late
            break
        host.kill_supervisors(late, max(0.5, cfg.fence_timeout - (time.monotonic() - t0)))
        for n in late:
            log.log(NOTICE, f"destroy VM {n} (started during the fence): "
                            f"{' '.join(cfg.command('vm_destroy', n))}")
        running = late
        known = sorted(set(known) | set(late))
    def failed(errors):   # a zfs command failed (timed out), not a dataset that is locked
        return [e for e in errors if "dataset" in e and (
            not e.get("unavailable") or e.get("reason", "").startswith("zfs get failed"))]
    # An inventory that failed (a host slow enough to lose its agent is slow for zfs too)
    # is asked again now that the VMs are gone: the locks must be on disk before the
    # reboot, which Hoster's start-all may follow.  Until one is complete, for at most
    # max(fence_timeout, 2 s) more (a zfs that hangs for good must not stop the reboot).
    until = time.monotonic() + max(2.0, cfg.fence_timeout)
    attempt = 0
    while failed(errors) and not debug and time.monotonic() < until:
        attempt += 1
        if attempt > 1:   # a zfs that fails at once is not asked in a tight loop
            time.sleep(min(0.5, max(0.0, until - time.monotonic())))
        log.log(logging.ERROR, f"fence: the inventory was incomplete ("
                             f"{'; '.join(e['error'] for e in failed(errors))[:300]}); "
                             f"asking zfs again ({attempt})")
        inventory, errors = host.inventory(
            snapshots=False, budget=max(1.0, until - time.monotonic()))
        _, record = record_and_lock(inventory, record)
    confirmed = False
    if incarnation is not None and not debug:
        if failed(errors):
            problems.append("the inventory is incomplete")
        if not gone:
            problems.append("VMs are not confirmed gone")
        if not problems:
            # every supervisor was killed before the destroys: one now was started during
            # the fence (a start under way when the agent died), and may start its VM
            rc = host.kill_supervisors(known, max(1.0, cfg.fence_timeout / 4))
            if rc != 1:
                problems.append("a VM supervisor was started during the fence" if rc == 0
                                else "the VM supervisors could not be checked")
            late = host.running_vms()
            if late:
                log.log(NOTICE, f"destroy VM {', '.join(late)} (started during the fence)")
                host.destroy_all(late, max(1.0, cfg.fence_timeout / 4))
                gone = False   # a VM ran after the destroys: reboot_now
                problems.append(f"VM {', '.join(late)} appeared after the destroys")
        if not problems:   # sent: a candidate may hold it even if no answer came back
            confirmed = True
            confirm_fence(cfg, log, reason, incarnation, record)
        if problems:
            log.log(logging.WARNING, f"fence not confirmed ({'; '.join(problems)}): the "
                                     "cluster fails this host over after failover_time")
    key = "reboot" if gone and not confirmed else "reboot_now"   # no rc.d after a confirmation
    argv = cfg.command(key)
    log.log(EMERG if not debug else NOTICE,
            f"{say}reboot: {' '.join(argv)}"
            + ("" if gone else " (VMs not confirmed gone within fence_timeout)")
            + (" (fence confirmation sent: no orderly shutdown)" if confirmed else ""))
    if not debug:
        run_cmd(argv, 30)


def confirm_fence(cfg, log, reason, incarnation, record):
    """POST fenced (issue 13 item 4) to every other candidate at once, each within
    max(ping_timeout, 1 s) (our own table is of no use to anyone after the reboot);
    returns at the first acknowledgement (a candidate that knows this incarnation), or
    when every one has answered or timed out.  True if one acknowledged it."""
    body = {"hostname": cfg.hostname, "startup_time": incarnation,
            "record": {"ts": record["ts"], "reason": reason, "vms": record["vms"],
                       "locked": record["locked"]}}
    client = Client(cfg)
    others = [c for c in cfg.candidates if c["hostname"] != cfg.hostname]
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(others)))
    timeout = max(cfg.ping_timeout, 1.0)
    futs = {ex.submit(client.request, c, "POST", "fenced", body, timeout):
            c["hostname"] for c in others}
    answers, ok = {}, []
    try:
        for f in concurrent.futures.as_completed(futs, timeout=timeout + 1):
            st, a = answers[futs[f]] = f.result()
            if st == 200 and isinstance(a, dict) and a.get("known") is True:
                ok.append(futs[f])
                break
    except concurrent.futures.TimeoutError:
        pass
    ex.shutdown(wait=False)
    said = "; ".join(f"{c}: {a if st is None else st}" for c, (st, a) in sorted(answers.items())
                     if c not in ok)
    log.log(NOTICE if ok else logging.WARNING,
            f"fence confirmed to {', '.join(ok) or 'no candidate'}"
            + (f" (not to {said[:300]})" if said else ""))
    return bool(ok)


# =============================================================================
# 4. Transport: signed JSON over HTTP(S)
# =============================================================================

def sign(secret, method, target, timestamp, nonce, body):
    """SPEC §4.3: hex HMAC-SHA256 over METHOD, TARGET, TIMESTAMP, NONCE, sha256(BODY)."""
    msg = "\n".join([method, target, str(timestamp), nonce, hashlib.sha256(body).hexdigest()])
    return hmac.new(secret.encode("utf-8"), msg.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_answer(secret, node, request_signature, status, body):
    """HMAC of an answer by `node` (sent as X-HA-Node), bound to the request it answers
    (its X-HA-Signature): answers are authenticated like requests, so nobody on the path
    can forge a vote, an acknowledgement or a plan without the secret, even without TLS,
    nor pass one node's answer off as another's."""
    msg = "\n".join(["ANSWER", node, request_signature, str(status),
                      hashlib.sha256(body).hexdigest()])
    return hmac.new(secret.encode("utf-8"), msg.encode("utf-8"), hashlib.sha256).hexdigest()


def signed_headers(secret, method, target, body, now=None):
    ts = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    return {"X-HA-Timestamp": str(ts), "X-HA-Nonce": nonce,
            "X-HA-Signature": sign(secret, method, target, ts, nonce, body)}


class NonceCache:
    """Nonces seen within the signature window; bounded in size and in time."""

    def __init__(self, window=SIGNATURE_WINDOW, max_size=200_000):
        self.window, self.max_size = window, max_size
        self.seen = {}
        self.lock = threading.Lock()

    def add(self, nonce, wall):
        """True if nonce is new (and now remembered); False on replay or when full."""
        with self.lock:
            if nonce in self.seen:
                return False
            if len(self.seen) >= self.max_size:
                cutoff = wall - 2 * self.window
                self.seen = {n: t for n, t in self.seen.items() if t >= cutoff}
                if len(self.seen) >= self.max_size:
                    return False
            self.seen[nonce] = wall
            return True


_TS_RE = re.compile(r"^[0-9]{1,12}$")
_NONCE_RE = re.compile(r"^[0-9a-fA-F]{16,64}$")
_SIG_RE = re.compile(r"^[0-9a-f]{64}$")


def verify_request(secret, nonces, method, target, headers, body, wall):
    """None if the request is authentic, else the reason it is not."""
    ts, nonce, sig = (headers.get("X-HA-Timestamp"), headers.get("X-HA-Nonce"),
                      headers.get("X-HA-Signature"))
    if ts is None or nonce is None or sig is None:
        return "missing X-HA-Timestamp, X-HA-Nonce or X-HA-Signature"
    if not _TS_RE.match(ts) or not _NONCE_RE.match(nonce) or not _SIG_RE.match(sig):
        return "malformed authentication header"
    if abs(int(ts) - wall) > SIGNATURE_WINDOW:
        return "timestamp outside the 60 s window"
    if not hmac.compare_digest(sign(secret, method, target, int(ts), nonce, body), sig):
        return "bad signature"
    if not nonces.add(nonce, wall):
        return "nonce replayed"
    return None


def tls_module():
    """The ssl module, imported on first use (see the imports)."""
    import ssl
    return ssl


def server_ssl_context(tls):
    ssl = tls_module()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls["cert"], tls["key"])
    ctx.load_verify_locations(tls["ca"])
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(tls):
    """Verify peers against the cluster CA; the name check is cert_names_match()."""
    ssl = tls_module()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(tls["ca"])
    ctx.load_cert_chain(tls["cert"], tls["key"])
    ctx.check_hostname = False  # checked by name *or* address, below
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def cert_names_match(cert, names):
    """True if the peer certificate names one of `names` (the hostname or the address in
    the config) in its subjectAltName (DNS or IP), or in its CN when it has no SAN."""
    sans = cert.get("subjectAltName", ())
    found = {v.lower() for k, v in sans if k in ("DNS", "IP Address")}
    if not sans:
        found = {v.lower() for rdn in cert.get("subject", ()) for k, v in rdn
                 if k == "commonName"}
    return any(n and n.lower() in found for n in names)


class _HTTPSConnection(http.client.HTTPConnection):
    """HTTPS to a peer whose certificate must name its hostname or its address (on
    HTTPConnection: http.client may lack HTTPSConnection, see the imports)."""

    default_port = 443

    def __init__(self, host, port, names, context, **kw):
        super().__init__(host, port, **kw)
        self.names, self.context = names, context

    def connect(self):
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.names[0])
        if not cert_names_match(self.sock.getpeercert(), self.names):
            self.sock.close()
            raise tls_module().SSLCertVerificationError(
                f"peer certificate does not name {' or '.join(n for n in self.names if n)}")


class Client:
    """Signed JSON requests to other nodes, each with a hard overall timeout."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.ssl = client_ssl_context(cfg.tls) if cfg.tls else None

    def request(self, peer, method, name, body=None, timeout=5.0):
        """peer: {address, port, protocol}.  Returns (status, JSON answer) or (None, error)."""
        target = API + name
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        headers = signed_headers(self.cfg.secret, method, target, data)
        headers["Content-Type"] = "application/json"
        start = time.monotonic()
        if peer.get("protocol") == "https":
            if self.ssl is None:
                return None, "https peer but no tls section in the config"
            conn = _HTTPSConnection(peer["address"], int(peer["port"]),
                                    [peer.get("hostname"), peer["address"]],
                                    timeout=timeout, context=self.ssl)
        else:
            conn = http.client.HTTPConnection(peer["address"], int(peer["port"]), timeout=timeout)
        try:
            conn.request(method, target, body=data if method == "POST" else None, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_ANSWER + 1)
            if time.monotonic() - start > timeout:
                return None, f"timed out after {timeout:g} s"
            got = resp.getheader("X-HA-Answer-Signature") or ""
            node = resp.getheader("X-HA-Node") or ""
            if not hmac.compare_digest(got, sign_answer(self.cfg.secret, node,
                                                        headers["X-HA-Signature"],
                                                        resp.status, raw)):
                return None, (f"answer {resp.status} is not signed with the cluster secret"
                              f"{'' if got else ' (no X-HA-Answer-Signature)'}")
            if peer.get("hostname") and node != peer["hostname"]:
                return None, f"answer signed by {node!r}, not by {peer['hostname']}"
            try:
                answer = json.loads(raw.decode("utf-8")) if raw else None
            except (UnicodeDecodeError, ValueError, RecursionError):
                answer = None
            return resp.status, answer
        except (OSError, http.client.HTTPException) as e:  # ssl.SSLError is an OSError
            return None, f"{type(e).__name__}: {e}"
        finally:
            conn.close()


def literal_addresses(addresses):
    """The IP address literals among `addresses` (hostnames are left out: resolving them
    could block; their hosts are vouched for by their first signed request)."""
    out = set()
    for a in addresses:
        try:
            out.add(str(ipaddress.ip_address(str(a))))
        except ValueError:
            pass
    return out


class Server(http.server.ThreadingHTTPServer):
    """Threaded HTTP(S) server that a flood or a slow client cannot take over.

    At most MAX_CONCURRENT requests at once, PER_CLIENT from one address, PER_CANDIDATE
    from a candidate's configured address (503 beyond): a manager holds a failover
    request open per batch, or per VM at a target that takes no batches (up to
    max_parallel_starts, at most PER_CANDIDATE).
    Addresses that are not known to belong to the cluster (the candidates' configured
    addresses, and any address that sent a correctly signed request within VOUCH_TTL)
    share MAX_CONCURRENT - RESERVED of the slots: strangers from many addresses cannot
    take the slots that answer the cluster's pings.  So with strangers and one
    candidate's starts at their limits, MAX_CONCURRENT - (MAX_CONCURRENT - RESERVED) -
    PER_CANDIDATE slots still answer the others' pings.  A request must be read (TLS
    handshake, headers, body) within READ_DEADLINE seconds, or its connection is shut
    down."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    MAX_CONCURRENT = 128
    RESERVED = 96
    PER_CLIENT = 16
    PER_CANDIDATE = 64
    READ_DEADLINE = 5.0
    VOUCH_TTL = 600.0
    MAX_VOUCHED = 4096

    def __init__(self, addr, handler, agent, ssl_ctx=None, known=()):
        self.agent = agent
        self.guard = threading.Lock()
        self.active = 0
        self.strangers = 0
        self.known = frozenset(known)
        self.vouched = {}    # address -> monotonic time of its last signed request
        self.per_client = {}
        self.deadlines = {}  # request socket -> monotonic time its reading must end
        self.slot_kind = {}  # request socket -> True if it holds a stranger's slot
        self.tls = ssl_ctx is not None
        super().__init__(addr, handler)
        if ssl_ctx is not None:
            self.socket = ssl_ctx.wrap_socket(self.socket, server_side=True,
                                              do_handshake_on_connect=False)
        self.reading = threading.Event()   # set while a request is being read
        threading.Thread(target=self._reaper, name="ha-http-reaper", daemon=True).start()

    def _reaper(self):
        while True:
            self.reading.wait()       # idle: no wakeups
            time.sleep(0.25)
            now = time.monotonic()
            with self.guard:
                late = [r for r, d in self.deadlines.items() if d <= now]
                for r in late:
                    del self.deadlines[r]
                if not self.deadlines:
                    self.reading.clear()
            for r in late:
                try:
                    r.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def read_done(self, request):
        """The handler has read the whole request: no deadline any more."""
        with self.guard:
            self.deadlines.pop(request, None)

    def vouch(self, ip):
        """ip sent a correctly signed request: it belongs to the cluster."""
        now = time.monotonic()
        with self.guard:
            self.vouched[ip] = now
            if len(self.vouched) > self.MAX_VOUCHED:
                for old in sorted(self.vouched, key=self.vouched.get)[:len(self.vouched) // 4]:
                    del self.vouched[old]

    def _stranger(self, ip, now):
        return ip not in self.known and now - self.vouched.get(ip, -self.VOUCH_TTL) \
            >= self.VOUCH_TTL

    def process_request(self, request, client_address):
        ip = client_address[0] if isinstance(client_address, tuple) else ""
        now = time.monotonic()
        with self.guard:
            stranger = self._stranger(ip, now)
            ok = self.active < self.MAX_CONCURRENT and \
                self.per_client.get(ip, 0) < (self.PER_CANDIDATE if ip in self.known
                                              else self.PER_CLIENT) and \
                (not stranger or self.strangers < self.MAX_CONCURRENT - self.RESERVED)
            if ok:
                self.active += 1
                self.strangers += stranger
                self.per_client[ip] = self.per_client.get(ip, 0) + 1
                self.deadlines[request] = now + self.READ_DEADLINE
                self.reading.set()
                self.slot_kind[request] = stranger
        if not ok:
            try:
                if self.tls:
                    raise OSError("no 503 over TLS: the handshake would block this thread")
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nContent-Length: 22\r\nConnection: close"
                                b"\r\n\r\n{\"error\": \"overload\"}\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            ip = client_address[0] if isinstance(client_address, tuple) else ""
            with self.guard:
                self.active -= 1
                self.strangers -= self.slot_kind.pop(request, False)
                self.deadlines.pop(request, None)
                if self.per_client.get(ip, 0) <= 1:
                    self.per_client.pop(ip, None)
                else:
                    self.per_client[ip] -= 1

    def handle_error(self, request, client_address):
        pass  # a broken client connection is not our error; handlers catch their own


class Handler(http.server.BaseHTTPRequestHandler):
    """Parses, authenticates and size-checks a request, then hands it to agent.api().

    Guarantees: every answer is JSON; no input produces a 5xx other than 503."""

    server_version = "hoster_ha"
    sys_version = ""
    timeout = 10  # seconds per socket operation: a slow client cannot hold a thread long

    def log_message(self, fmt, *args):
        pass

    def _reply(self, status, obj, text=None):
        data = (text if text is not None else json.dumps(obj) + "\n").encode("utf-8")
        headers = getattr(self, "headers", None)
        request_sig = headers.get("X-HA-Signature", "") if headers is not None else ""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4" if text is not None
                             else "application/json")
            self.send_header("Content-Length", str(len(data)))
            if _SIG_RE.match(request_sig):
                cfg = self.server.agent.cfg
                self.send_header("X-HA-Node", cfg.hostname)
                self.send_header("X-HA-Answer-Signature", sign_answer(
                    cfg.secret, cfg.hostname, request_sig, status, data))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass
        self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server while parsing (bad request line, unknown method):
        JSON like every other answer, and never a 5xx other than 501/503."""
        if code == 505:
            code = 400
        if not getattr(self, "request_version", "").startswith("HTTP/1."):
            self.request_version = "HTTP/1.0"
        self._reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def _not_allowed(self):
        self._reply(405, {"error": "method not allowed"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _serve(self, method):
        agent = self.server.agent
        target = self.path
        try:
            path = urllib.parse.urlsplit(target).path
        except ValueError:
            return self._reply(400, {"error": "malformed request target"})
        if path in ("/metrics", "/api/v1/ha/metrics"):
            if method != "GET":
                return self._not_allowed()
            return self._reply(200, None, text=agent.metrics())
        if not path.startswith(API) or path[len(API):] not in agent.ROUTES:
            return self._reply(404, {"error": "unknown path"})
        name = path[len(API):]
        if method not in agent.ROUTES[name]:
            return self._not_allowed()
        length = self.headers.get("Content-Length")
        if length is None:
            if method == "POST":
                return self._reply(411, {"error": "Content-Length required"})
            length = "0"
        if not re.fullmatch(r"[0-9]{1,18}", length):
            return self._reply(400, {"error": "bad Content-Length"})
        if int(length) > MAX_BODY:
            return self._reply(413, {"error": f"body over {MAX_BODY} bytes"})
        try:
            body = self.rfile.read(int(length))
        except OSError:
            self.close_connection = True
            return
        if len(body) != int(length):
            return self._reply(400, {"error": "body shorter than Content-Length"})
        self.server.read_done(self.request)
        why = verify_request(agent.cfg.secret, agent.nonces, method, target, self.headers,
                             body, time.time())
        if why is not None:
            agent.count("auth_failures")
            return self._reply(401, {"error": why})
        if isinstance(self.client_address, tuple):
            self.server.vouch(self.client_address[0])
        obj = None
        if method == "POST":
            try:
                obj = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                return self._reply(400, {"error": "body is not valid JSON"})
            if not isinstance(obj, dict):
                return self._reply(400, {"error": "body must be a JSON object"})
        try:
            status, answer = agent.api(method, name, obj)
        except Exception:  # noqa: BLE001 -- a bug must not take the server down
            agent.log.exception(f"internal error serving {method} {name}")
            status, answer = 503, {"error": "internal error"}
        self._reply(status, answer)


# =============================================================================
# 5. Agent: threads and the control loop
# =============================================================================

class SyslogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that knows NOTICE, ALERT and EMERG and keeps a message in one
    datagram."""

    priority_map = dict(logging.handlers.SysLogHandler.priority_map,
                        NOTICE="notice", ALERT="alert", EMERG="emerg")

    def format(self, record):
        return super().format(record).encode("utf-8")[:1900].decode("utf-8", "ignore")

    def handleError(self, record):
        pass  # syslogd gone or restarting: the log_file (if any) still has the line


def setup_logging(cfg, tag, stderr=False):
    """Logger `tag` writing to syslog (FreeBSD /var/run/log, Linux /dev/log) and log_file."""
    log = logging.getLogger(tag)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    for sock in ("/var/run/log", "/dev/log"):
        if os.path.exists(sock):
            try:
                h = SyslogHandler(address=sock, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            except OSError:
                continue
            h.ident = f"{tag}[{os.getpid()}]: "
            h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
            log.addHandler(h)
            break
    fmt = logging.Formatter(f"%(asctime)s {cfg.hostname} {tag}[%(process)d]: "
                            "%(levelname)s: %(message)s")
    fmt.default_time_format, fmt.default_msec_format = "%Y-%m-%dT%H:%M:%S", "%s.%03d"
    if cfg.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.log_file)), exist_ok=True)
        h = logging.handlers.WatchedFileHandler(cfg.log_file)
        h.setFormatter(fmt)
        log.addHandler(h)
    if stderr:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def read_pid(path):
    """The PID in a pid file if that process exists (and is not a zombie), else None."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and pid_alive(pid) else None


def read_incarnation(path, pid):
    """The startup_time that run_dir/hoster_ha.incarnation gives for agent `pid`, or None
    (no file, another agent's, unreadable)."""
    try:
        with open(path) as f:
            parts = f.read(100).split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) == pid:
        return int(parts[1])
    return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: count it as gone (Linux /proc; FreeBSD has no /proc)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_pid_file(path):
    write_atomic(path, f"{os.getpid()}\n".encode(), mode=0o644)


def remove_file(path, only_if_pid=None):
    try:
        if only_if_pid is not None:
            with open(path) as f:
                if f.read().strip() != str(only_if_pid):
                    return
        os.unlink(path)
    except (OSError, ValueError):
        pass


class Paths:
    def __init__(self, cfg):
        self.pid = os.path.join(cfg.run_dir, "hoster_ha.pid")
        # "PID STARTUP_TIME" of the running agent: the incarnation its watchdog confirms
        self.incarnation = os.path.join(cfg.run_dir, "hoster_ha.incarnation")
        self.wd_pid = os.path.join(cfg.run_dir, "ha_watchdog.pid")
        self.wd_ack = os.path.join(cfg.run_dir, "ha_watchdog.ack")
        self.mode = os.path.join(cfg.run_dir, "hoster_ha.mode")
        self.term = os.path.join(cfg.state_dir, "term")
        self.fence = os.path.join(cfg.state_dir, "fence.json")
        self.running = os.path.join(cfg.state_dir, "running.json")
        self.stopped = os.path.join(cfg.state_dir, "stopped.json")  # an orderly stop's VMs
        self.maintenance = os.path.join(cfg.state_dir, "maintenance")
        self.events = os.path.join(cfg.state_dir, "events.jsonl")
        self.members = os.path.join(cfg.state_dir, "members.json")
        self.plans = os.path.join(cfg.state_dir, "plans.json")


class EventLog:
    """state_dir/events.jsonl: one JSON object per line, appended and flushed."""

    def __init__(self, path, node):
        self.path, self.node = path, node
        self.lock = threading.Lock()

    def append(self, event, **details):
        line = json.dumps(dict({"ts": round(time.time(), 3), "node": self.node, "event": event},
                               **details), default=str) + "\n"
        with self.lock:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
            except OSError:
                pass

    @staticmethod
    def read(path):
        """Events as dicts; a torn or corrupt line (a crash mid-write) is skipped."""
        out = []
        try:
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        ev = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError):
                        continue
                    if isinstance(ev, dict):
                        out.append(ev)
        except OSError:
            pass
        return out


def read_term(path):
    """The persisted term, or None if state_dir/term does not exist."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise RuntimeError(f"{path} is corrupt ({text[:40]!r}); refusing to vote with an "
                           "unknown term: restore it or remove it after every candidate has "
                           "restarted")
    return int(text)


def read_state(path):
    """A state_dir JSON file written from a "persist" action (members.json, plans.json), or
    None if there is none.  A corrupt one stops the start: forgetting members or where VMs
    were moved is unsafe (SPEC §3.4)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{path} is unreadable or corrupt ({e}); restore it, or remove "
                           "it while the other two candidates run") from None
    if not isinstance(data, dict):
        raise RuntimeError(f"{path} is corrupt (not a JSON object); restore it, or remove it "
                           "while the other two candidates run")
    return data


def read_fence_file(path):
    """state_dir/fence.json (our last fence) or running.json (what we ran while armed:
    a power loss leaves no fence record) as {"vms", "locked"} (lists of VM names; a
    record written before `locked` existed has none), or None if absent or unreadable."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return {k: [v for v in record.get(k) or [] if valid_vm_name(v)]
            if isinstance(record.get(k), list) else [] for k in ("vms", "locked")}


def read_fence_record(path):
    """The VMs of read_fence_file(path), or []."""
    return (read_fence_file(path) or {}).get("vms", [])


def watchdog_script():
    return os.path.join(os.path.dirname(os.path.realpath(__file__)), "ha_watchdog.py")


class Notifier:
    """commands.notify (issue 14 item 4): run the command once per event, the event as one
    JSON object on its stdin.  Bounded: one command at a time, each killed after
    NOTIFY_TIMEOUT, at most NOTIFY_QUEUE events waiting; one more is dropped (and counted).
    submit() never blocks: a fence or a failover is never delayed by a notification.  A
    failing command is logged once (and again once it worked in between)."""

    NOTIFY_TIMEOUT = 10.0
    NOTIFY_QUEUE = 20

    def __init__(self, argv, node, log, count=None, timeout=None, queue=None):
        self.argv, self.node, self.log = list(argv), node, log
        self.count = count or (lambda key: None)
        self.timeout = timeout or self.NOTIFY_TIMEOUT
        self.max_queue = queue or self.NOTIFY_QUEUE
        self.lock = threading.Lock()
        self.queue = collections.deque()
        self.running = False     # the one sender thread is alive
        self.failing = False     # the last run failed (logged once)

    def submit(self, event, message, details):
        ev = dict(details, event=event, time=round(time.time(), 3), node=self.node,
                  message=message)
        with self.lock:
            full = len(self.queue) >= self.max_queue
            if not full:
                self.queue.append(ev)
            start = not full and not self.running
            self.running = self.running or start
        if full:
            self.count("notify_dropped")   # outside our lock: count takes the agent's
            return False
        if not start:
            return True
        threading.Thread(target=self._drain, name="ha-notify", daemon=True).start()
        return True

    def _drain(self):
        for _ in range(10_000):   # bounded; the queue is refilled at most that often
            with self.lock:
                if not self.queue:
                    self.running = False
                    return
                ev = self.queue.popleft()
            self._run(ev)
        with self.lock:
            self.running = False

    def _run(self, ev):
        data = (json.dumps(ev, sort_keys=True, default=str) + "\n").encode()
        error = None
        try:
            p = subprocess.run(self.argv, input=data, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=self.timeout, check=False)
            if p.returncode != 0:
                error = f"exit status {p.returncode}: {last_line(p.stderr.decode(errors='replace'))}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {self.timeout:g} s"
        except OSError as e:
            error = str(e)
        if error is None:
            self.failing = False
            return
        self.count("notify_dropped")
        if not self.failing:
            self.failing = True
            self.log.warning(f"commands.notify failed for event {ev['event']} ({error}); "
                             "further failures are not logged until it works again")


def notify_detached(argv, node, log, event, message, **details):
    """The fencing watchdog's notification (issue 14 item 4, "sent by the fencing host when
    it can"): commands.notify started in its own session with the event on its stdin,
    never waited for (the host is going down; a fence is never delayed).  False if it
    could not be started (logged)."""
    ev = dict(details, event=event, time=round(time.time(), 3), node=node, message=message)
    try:
        p = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            p.stdin.write((json.dumps(ev, sort_keys=True, default=str) + "\n").encode())
        finally:
            p.stdin.close()
    except OSError as e:
        log.warning(f"commands.notify failed for event {event} ({e})")
        return False
    return True


def prometheus_text(series):
    """[(name, type, help, [(labels dict, value)])] in Prometheus text format 0.0.4."""
    def esc(v):
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    def num(v):
        if isinstance(v, bool):
            return str(int(v))
        if isinstance(v, float):
            return "NaN" if math.isnan(v) else repr(round(v, 3))
        return str(v)
    out = []
    for name, kind, helptext, samples in series:
        out += [f"# HELP {name} {helptext}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            lab = ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{name}{{{lab}}} {num(value)}" if lab else f"{name} {num(value)}")
    return "\n".join(out) + "\n"


class AgentAPI:
    """What an agent answers over HTTP (Handler calls api() from its request
    threads), and the CLI's stop, maintenance and terminate that go through it.

    A part of Agent (its fields: Agent's docstring)."""

    def api(self, method, name, body):
        now = time.monotonic()
        if name in ("register", "ping"):
            why = check_fields(body, REGISTER_FIELDS if name == "register" else PING_FIELDS)
            if why is None and not valid_hostname(body["hostname"]):
                why = "field 'hostname' is not a valid hostname"
            if why is None and name == "register":
                why = self._check_register(body)
            if why is not None:
                return 400, {"error": why}
            with self.lock:
                if name == "register":
                    answer = self.core.handle_register(body, now)
                else:
                    answer = self.core.handle_ping(body, now)
                self.persist_now()  # the answer shows term_seen / acknowledges: on disk first
                return answer
        if name == "members":
            if not self.cfg.is_candidate:
                return 404, {"error": "this node is not a candidate"}
            with self.lock:
                return 200, self.core.members_answer(now)
        if name == "plan":
            why = check_fields(body, PLAN_BODY_FIELDS) or next(
                (f"entries: {w}" for w in (check_plan_entry(e) for e in body["entries"]) if w),
                None)
            if why is not None:
                return 400, {"error": why}
            with self.lock:
                answer = self.core.handle_plan(body, now)
                self.persist_now()     # an acknowledged plan is on disk
                return answer
        if name == "failover":
            entries = body.get("entries") if "entries" in body else [body]
            why = None if isinstance(entries, list) and 0 < len(entries) <= \
                MAX_BATCH else f"'entries': a list of 1 to {MAX_BATCH}"
            for e in entries if why is None else ():
                why = check_failover_entry(e)
                if why is not None:
                    break
            if why is not None:
                return 400, {"error": why}
            if "entries" not in body:
                return self.failover(body)
            return 200, {"ok": True, "results": self.failovers(entries)}
        if name == "vms":
            return 200, self.vms()
        if name in ("leave", "fenced"):
            why = check_fields(body, LEAVE_FIELDS if name == "leave" else FENCED_FIELDS)
            if why is None and not valid_hostname(body["hostname"]):
                why = "field 'hostname' is not a valid hostname"
            if why is not None:
                return 400, {"error": why}
            with self.lock:
                answer = (self.core.handle_leave if name == "leave" else
                          self.core.handle_fenced)(body, now)
                self.persist_now()     # an acknowledged leave or fence is on disk
                return answer
        if name == "terminate":
            return self.terminate()
        if name == "maintenance":
            if not isinstance(body.get("on"), bool):
                return 400, {"error": "field 'on' must be true or false"}
            return self.maintenance(body["on"])
        return 200, self.status()

    def leave(self):
        """§3.7: POST leave to the 3 candidates.  Returns the hostnames that acknowledged."""
        with self.lock:
            body = self.core.leave_body()
        timeout = max(2.0, 2 * self.cfg.ping_timeout)
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as ex:
            futs = {c: ex.submit(self.client.request, self.cfg.candidate(c), "POST", "leave",
                                 body, timeout) for c in self.cfg.candidate_names}
        return sorted(c for c, f in futs.items() if f.result()[0] == 200)

    def try_leave(self, strict):
        """Leave the cluster before stopping.  (ok, message).  strict (the `stop` command):
        2 acknowledgements needed; otherwise an unarmed node may stop without them."""
        acks = self.leave()
        with self.lock:
            armed = self.core.armed
            self.core.leave_result(acks)  # 2 acks: disarmed, our VMs are not protected
        if len(acks) >= 2:
            msg = f"left the cluster (acknowledged by {', '.join(acks)})"
            self.log.log(NOTICE, msg)
            return True, msg
        msg = (f"leave acknowledged by {len(acks)} of 3 candidates"
               f"{' (' + ', '.join(acks) + ')' if acks else ''}; 2 are needed")
        if not strict and not armed:
            self.log.warning(f"{msg}; the node is not armed, so it stops anyway")
            return True, msg
        self.log.error(f"refusing to stop: {msg}. A node that stopped without leaving would be "
                       "failed over while its VMs still run")
        return False, f"refusing to stop: {msg}"

    def leave_then_stop(self):
        ok, _ = self.try_leave(strict=False)
        if ok:
            self.stopping.set()
        else:
            self.stop_requested.clear()
        self.leaving = False

    def terminate(self):
        """POST terminate (and `stop`): leave, then stop the agent and its watchdog."""
        ok, msg = self.try_leave(strict=True)
        if not ok:
            return 409, {"error": msg}
        self.events.append("terminated", detail=msg)
        threading.Timer(0.2, self.stopping.set).start()  # after this answer is sent
        return 200, {"ok": True, "message": msg}

    def maintenance(self, on):
        """POST maintenance: `on` waits until 2 candidates know (then disarms); kept in state_dir."""
        with self.lock:
            self.core.set_maintenance(on, time.monotonic())
        if on:
            deadline = time.monotonic() + 3 * self.cfg.ping_interval + self.cfg.ping_timeout + 1
            while time.monotonic() < deadline:
                with self.lock:
                    if self.core.maintenance:
                        break
                time.sleep(0.05)
            else:
                with self.lock:
                    self.core.set_maintenance(False, time.monotonic())
                return 409, {"error": "maintenance not acknowledged by 2 candidates in time; "
                                      "still armed"}
            write_atomic(self.paths.maintenance, b"on\n", mode=0o644)
            return 200, {"ok": True, "maintenance": on}
        remove_file(self.paths.maintenance)
        # off: the node arms again only once 2 candidates know (SPEC §3.4)
        deadline = time.monotonic() + 3 * self.cfg.ping_interval + self.cfg.ping_timeout + 1
        while time.monotonic() < deadline:
            with self.lock:
                if self.core.flags_clear():
                    return 200, {"ok": True, "maintenance": on}
            time.sleep(0.05)
        return 200, {"ok": True, "maintenance": on, "note": "not acknowledged by 2 "
                     "candidates yet; the node arms once they have"}

    def vms(self):
        """GET vms: this host's VMs (SPEC §4.3), a VM being started counted as live.
        A VM that runs here (vmm_dir) but is not in the inventory (its dataset became
        unavailable, its vm_config.json is unreadable) is listed as live, with
        "unlisted": true: a partial inventory never makes a running VM look dead."""
        seen_at = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ha-vms") as ex:
            free = ex.submit(self.host.free_memory)    # meanwhile (a failover waits for it)
            vms, errors = self.host.inventory()
            free = free.result()
        self.inventory_cache = vms
        unavailable = unavailable_datasets(errors)
        host_reasons = self.host_readiness()
        with self.lock:
            self.core.set_datasets(unavailable, seen_at)
            self.core.set_host_readiness(host_reasons)
            starting = self.core.starting()
            pending = self.core.demotion_pending()
            not_ready = self.core.not_ready_reasons()
        out = []
        for v in vms:
            state = ("starting" if v["vm_name"] in starting else
                     "live" if v["live"] else "stopped")
            out.append({"vm_name": v["vm_name"], "production": v["production"],
                        "live": state != "stopped", "state": state,
                        # ready: this host can start it (item 2.3)
                        "ready": not host_reasons and v["vm_dataset"] not in unavailable,
                        "parent_host": v["parent_host"],
                        "current_host": self.cfg.hostname if state != "stopped" else None,
                        "latest_snapshot": v["latest_snapshot"], "memory": v["memory"]})
        running = self.host.running_vms()
        listed = {v["vm_name"] for v in vms}
        for name in sorted(set(running) - listed):
            out.append({"vm_name": name, "production": False, "live": True, "state": "live",
                        "parent_host": None, "current_host": self.cfg.hostname,
                        "latest_snapshot": None, "memory": None, "unlisted": True})
        return {"host": {"hostname": self.cfg.hostname, "free_memory": free,
                         "running_vms": len(running), "ready": not not_ready,
                         "max_parallel_starts": self.cfg.max_parallel_starts,
                         "not_ready": not_ready,
                         "datasets_unavailable": unavailable, "demotion_pending": pending,
                         "time": round(time.time(), 3)},
                "vms": out, "errors": errors}

    def status(self):
        with self.lock:
            st = self.core.status(time.monotonic())
        st.update(mode=self.mode, api_pid=os.getpid(),
                  watchdog_pid=self.wd_pid if self.wd_pid and pid_alive(self.wd_pid) else None)
        inv = self.inventory_cache       # a complete list or None (no lock: see the class)
        st["vms_running"] = sorted(
            v["vm_name"] for v in inv if isinstance(v, dict) and v.get("live") and
            v.get("production") and v.get("parent_host") == self.cfg.hostname) \
            if isinstance(inv, list) else None
        return st

    def count(self, key):
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + 1

    def metrics(self, now=None):
        """GET /metrics: Prometheus text format (README "Metrics" lists every series)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            core = self.core
            st = core.status(now)
            states = core.member_states(now) if core.is_candidate else None
            reach = {c: core.reach[c] is not None and
                     now - core.reach[c] <= self.cfg.survival_window for c in core.candidates}
            ages = core.silence_ages(now)
            margin = core.survival_margin(now)
            counters = dict(self.counters)
            protection = dict(core.protection) if st["role"] == "manager" else None
        starts = {r: counters.get("vm_starts_" + r, 0) for r in ("ok", "failed")}
        series = [
            ("hoster_ha_up", "gauge", "1 while the agent runs", [({}, 1)]),
            ("hoster_ha_manager", "gauge", "1 if this node is the manager",
             [({}, int(st["role"] == "manager"))]),
            ("hoster_ha_term", "gauge", "term of the manager this node knows", [({}, st["term"])]),
            ("hoster_ha_armed", "gauge", "1 if this node is armed", [({}, int(st["armed"]))]),
            ("hoster_ha_ready", "gauge", ("1 if this node can start its VMs (Hoster "
              "initialised, vmm present, every VM dataset available)"),
             [({}, int(st["ready"]))]),
            ("hoster_ha_reachable_candidates", "gauge", ("candidates reached within "
              "survival_window"), [({}, len(st["reachable_candidates"]))]),
            ("hoster_ha_candidate_reachable", "gauge", ("1 if the candidate answered a ping "
              "sent within survival_window"), [({"candidate": c}, int(v))
                                             for c, v in sorted(reach.items())]),
            ("hoster_ha_candidate_last_ping_age_seconds", "gauge", ("seconds since the send time "
              "of the candidate's last good ping (absent: never answered)"),
             [({"candidate": c}, v) for c, v in sorted(ages.items()) if v is not None]),
            ("hoster_ha_survival_margin_seconds", "gauge", ("seconds until this node loses "
              "quorum (and fences if armed) if no candidate answers any more"), [({}, margin)]),
            ("hoster_ha_fences_total", "counter", ("fences: members this node failed as manager, "
              "and its own self-fence decisions"), [({}, counters.get("fences", 0))]),
            ("hoster_ha_vm_starts_total", "counter", ("failover starts of VMs on this node, by "
              "result"), [({"result": r}, v) for r, v in sorted(starts.items())]),
            ("hoster_ha_notify_dropped_total", "counter", ("notifications dropped (queue full, "
              "command failed or timed out)"), [({}, counters.get("notify_dropped", 0))]),
            ("hoster_ha_auth_failures_total", "counter", "requests refused with 401",
             [({}, counters["auth_failures"])]),
            ("hoster_ha_ping_failures_total", "counter", "pings to candidates that failed",
             [({}, counters["ping_failures"])]),
        ]
        if states is not None:
            series.append(("hoster_ha_members", "gauge", (
                "members in this candidate's table, each in the first of left, failed, "
                "maintenance, unarmed, alive that fits"),
                [({"state": k}, v) for k, v in states.items()]))
        if protection is not None:   # the manager's last protection round
            series += [
                ("hoster_ha_vm_protected", "gauge", ("1 if the production VM would come back "
                  "if its host failed"), [({"vm": vm}, int(r["protected"]))
                                          for vm, r in sorted(protection.items())]),
                ("hoster_ha_vm_replica_age_seconds", "gauge", ("age of the VM's newest snapshot "
                  "on an eligible member (absent: none)"),
                 [({"vm": vm}, r["replica_age_seconds"]) for vm, r in sorted(protection.items())
                  if r["replica_age_seconds"] is not None]),
                ("hoster_ha_unprotected_vms", "gauge", "production VMs that are not protected",
                 [({}, sum(not r["protected"] for r in protection.values()))])]
        return prometheus_text(series)

    @staticmethod
    def _check_register(body):
        if body["protocol"] not in ("http", "https"):
            return "field 'protocol' must be http or https"
        if not 1 <= body["port"] <= 65535:
            return "field 'port' out of range"
        if not ADDRESS_RE.fullmatch(body["address"]):
            return "field 'address' is not a host name or IP address"
        if not (_is_number(body["failover_time"]) and body["failover_time"] > 0):
            return "field 'failover_time' must be a number of seconds above 0"
        if body["failover_strategy"] not in STRATEGIES:
            return "field 'failover_strategy' is not a known strategy"
        if not all(valid_vm_name(v) for v in body["fenced_vms"]):
            return "field 'fenced_vms' must be a list of VM names"
        for k in ("stopped_vms", "locked_vms"):
            vms = body.get(k, [])
            if not (isinstance(vms, list) and all(valid_vm_name(v) for v in vms)):
                return f"field '{k}' must be a list of VM names"
        return None


class StartOrder:
    """The entries of one batch take start slots in their order (the manager's, by
    vm_priority): entry i waits until every entry before it has taken a slot or has
    passed without starting."""

    def __init__(self, slots):
        self.slots = slots
        self.cond = threading.Condition()
        self.next = 0
        self.done = set()

    def take(self, i):
        with self.cond:
            self.cond.wait_for(lambda: self.next >= i)
        self.slots.acquire()
        self.passed(i)

    def passed(self, i):
        with self.cond:
            self.done.add(i)
            while self.next in self.done:
                self.next += 1
            self.cond.notify_all()


class AgentTarget:
    """This host as a failover target and a returning host (SPEC §3.4, §3.6):
    its local copies, the start of a VM a failover asks for and its confirmation, the
    undo of a start that failed, and the demotion of VMs moved away.

    A part of Agent (its fields: Agent's docstring)."""

    def local_copy(self, name):
        """Our copy of VM `name` for a failover, without a full inventory per request: the
        dataset and config path from the cached inventory (the manager's GET vms has just
        refreshed it), else from a fresh one; production, parent and strategy re-read from
        its vm_config.json, live from vmm_dir.  None if there is no readable copy."""
        for attempt in ("cache", "fresh"):
            vms = self.inventory_cache if attempt == "cache" else None
            if vms is None:
                vms, _ = self.host.inventory(snapshots=False)
                self.inventory_cache = vms
            v = next((x for x in vms if x["vm_name"] == name), None)
            if v is None:
                continue
            try:
                with open(v["config_path"], "rb") as f:
                    vm_cfg = json.loads(f.read().decode("utf-8"))
            except (OSError, ValueError, RecursionError):
                continue
            if not isinstance(vm_cfg, dict):
                continue
            return dict(v, production=is_production(vm_cfg),
                        parent_host=vm_cfg.get("parent_host"),
                        failover_strategy=vm_cfg.get("failover_strategy"),
                        live=os.path.exists(os.path.join(self.cfg.vmm_dir, name)))
        return None

    def failovers(self, entries):
        """POST failover with `entries` (a batch, issue 13 item 1): every entry as if it
        had come alone, all at once; [{uid, status, answer}] once every one has ended."""
        if len({e["uid"] for e in entries}) < len(entries):
            dup = "the same uid twice in one request"
            return [{"uid": e["uid"], "status": 400, "answer": {"error": dup}} for e in entries]
        order = StartOrder(self.start_slots)

        def one(i, e):
            try:
                return self.failover(e, turn=lambda: order.take(i))
            except Exception as x:   # whatever happened, it may have started: never "failed"
                self.log.exception(f"failover of VM {e['vm_name']} (uid {e['uid']})")
                return 409, {"error": f"internal error: {x}", "uid": e["uid"], "live": True}
            finally:
                order.passed(i)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(entries),
                                                   thread_name_prefix="ha-start") as ex:
            results = list(ex.map(one, range(len(entries)), entries))
        return [{"uid": e["uid"], "status": st, "answer": ans}
                for e, (st, ans) in zip(entries, results)]

    def failover(self, body, turn=None):
        """POST failover: decide in the core, start the VM here, confirm it is live.
        turn: takes a start slot in the batch's order (StartOrder.take)."""
        v = None if body.get("check") else self.local_copy(body["vm_name"])
        reasons = None if body.get("check") else self.host_readiness()
        with self.lock:
            if reasons is not None:
                self.core.set_host_readiness(reasons)
                # its dataset's state (every dataset's, if no copy is visible: it may be
                # in an unavailable one), as checked every ping_interval
                reasons = self.core.not_ready_reasons(v.get("vm_dataset") if v else None)
            decision = self.core.handle_failover(
                body, time.monotonic(), None if v is None else
                {"live": v["live"], "parent_host": v["parent_host"]}, reasons)
        if decision[0] != "start":
            return decision
        entry = decision[1]
        self.sync_incarnation()   # a start under way: the watchdog's fence is not confirmed
        try:
            error = self.start_vm(v, turn)
        except Exception as x:    # e.g. a vm_config.json field of a type nobody expected
            self.log.exception(f"start of VM {v['vm_name']}")
            error = f"internal error: {x}"
        unknown = False
        if error == FENCING or isinstance(error, Refused):
            pass    # nothing started; the copy stays locked (start_commands): no undo
        elif error is not None:
            unknown = not self.undo_start(v, entry["restore_parent"], error)
            if unknown:
                self.unresolved[entry["uid"]] = (v, entry["restore_parent"], error)
        with self.lock:
            answer = self.core.finish_failover(body["uid"], error is None, error,
                                               time.monotonic(), unknown=unknown,
                                               refused=isinstance(error, Refused))
        self.sync_incarnation()
        if error is None:
            self.note_running(v["vm_name"])
        return answer

    def sync_incarnation(self):
        """run_dir/hoster_ha.incarnation ("PID STARTUP_TIME") exists only while no failover
        start is under way here (nor one not confirmed gone) and the agent is not fencing:
        the watchdog confirms a fence (POST fenced) only with it, and a `hoster vm start`
        this agent ran could outlive it and start its VM after the watchdog's checks."""
        with self.lock:
            ok = not self.core.starting() and not self.core.fenced
            if ok:
                write_atomic(self.paths.incarnation,
                             f"{os.getpid()} {self.startup_time}\n".encode(), mode=0o644)
            else:
                remove_file(self.paths.incarnation)

    def start_vm(self, v, turn=None):
        """Apply the failover strategy, run `hoster vm start`, and confirm the start: the
        VM must appear within start_timeout and stay present for start_confirm
        (start_verdict).  Returns None, or the error (the caller cleans up).  The commands
        run in one of max_parallel_starts slots (start_timeout counts from the moment it
        has one); the confirmation holds none: it only watches."""
        (turn or self.start_slots.acquire)()
        try:
            appear_by = time.monotonic() + self.cfg.start_timeout
            error = self.start_commands(v, appear_by)
        finally:
            self.start_slots.release()
        return error if error is not None else self.confirm_start(v["vm_name"], appear_by)

    def start_commands(self, v, appear_by):
        """The failover strategy and `hoster vm start`, within appear_by.  Returns FENCING,
        having started nothing, once the node fences: a start that waited for its slot
        while the fence ran must not rewrite the lock the fence wrote (a reboot would find
        parent_host naming this host, and Hoster's start-all would start the VM here
        while the cluster starts it elsewhere).  The core sets `fenced` under self.lock
        before the fence writes its locks: parent_host is rewritten under that lock, and a
        cireset that ran while the fence began is followed by a lock again.  Returns a
        Refused, having touched nothing, if the node went into maintenance or began to
        leave while the start waited for its slot."""
        name, cfg = v["vm_name"], self.cfg
        strategy = STRATEGIES.get(v.get("failover_strategy") or "", cfg.failover_strategy)
        with self.lock:
            why = None if self.core.fenced else self.core.start_refusal()
        if why:   # maintenance or a leave since the request came (it waited for a slot)
            return Refused(why)
        if strategy == "change-parent":
            with self.lock:
                if self.core.fenced:
                    return FENCING
                try:
                    self.host.set_parent(v["config_path"], cfg.hostname)
                except (OSError, ValueError) as e:
                    return f"cannot set parent_host in {v['config_path']}: {e}"
        else:
            with self.lock:
                if self.core.fenced:
                    return FENCING
            rc, out, err = run_cmd(cfg.command("vm_cireset", name),
                                   max(1.0, appear_by - time.monotonic()))
            if rc != 0:
                return f"hoster vm cireset {name} exited {rc}: {command_text(out, err)}"
        with self.lock:
            if self.core.fenced:
                try:
                    self.host.set_parent(v["config_path"], lock_name(time.time()))
                except (OSError, ValueError) as e:
                    self.log.log(CRIT, f"cannot lock VM {name} again while fencing: {e}")
                return FENCING
        rc, out, err = run_cmd(cfg.command("vm_start", name),
                               max(1.0, appear_by - time.monotonic()))
        if rc is None:
            return f"hoster vm start {name} did not return within {cfg.start_timeout:g} s"
        if rc != 0:
            return f"hoster vm start {name} exited {rc}: {command_text(out, err)}"
        return None

    def confirm_start(self, name, appear_by):
        """The VM must appear by appear_by and stay present for start_confirm."""
        cfg = self.cfg
        live = os.path.join(cfg.vmm_dir, name)
        seen_at = vanished_at = None
        t0 = time.monotonic()
        while True:   # bounded: appear_by, then start_confirm
            now = time.monotonic()
            present = os.path.exists(live)
            if present and seen_at is None:
                seen_at = now
            elif not present and seen_at is not None and vanished_at is None:
                vanished_at = now
            verdict, why = start_verdict(now, appear_by, cfg.start_confirm, seen_at,
                                         vanished_at)
            if verdict == "ok":
                return None
            if verdict == "failed":
                if seen_at is None:
                    why = f"{live} did not appear within {cfg.start_timeout:g} s"
                return f"VM {name} did not stay up after `hoster vm start`: {why}"
            # look often until it appears (a start should not be 0.1 s later than it needs
            # to be), then at a pace that dozens of starts at once do not turn into a load
            time.sleep(0.02 if seen_at is None and now - t0 < 1 else 0.1)

    def undo_start(self, v, restore_parent, error):
        """After a failed start, before the failure is reported (SPEC §3.4): stop what
        `hoster vm start` may have launched (commands.vm_kill_supervisor), destroy the VM
        if it exists, set the copy's parent_host back (restore_parent; None: lock it) and
        watch the VM stay absent for start_confirm (absence_verdict).  Bounded by
        fence_timeout + start_confirm.  True when all of that succeeded; False: the VM
        may still run or start here (the caller answers so that the manager waits)."""
        name, cfg = v["vm_name"], self.cfg
        self.log.warning(f"start of VM {name} failed: {error}; stopping what it launched "
                         "before reporting the failure")
        give_up = time.monotonic() + cfg.fence_timeout + cfg.start_confirm
        ok = True
        argv = cfg.command("vm_kill_supervisor", name)

        def kill():
            rc, out, err = run_cmd(argv, max(0.5, min(10.0, give_up - time.monotonic())))
            if rc not in (0, 1):   # pkill: 0 killed some, 1 none ran
                self.log.error(f"{' '.join(argv)} failed ({rc}): {command_text(out, err)}")
                return False
            return True
        ok = kill()
        live = os.path.join(cfg.vmm_dir, name)
        if os.path.exists(live):
            self.host.destroy_all([name], max(0.5, give_up - time.monotonic() -
                                              cfg.start_confirm))
        parent = restore_parent if restore_parent is not None else lock_name(time.time())
        try:
            self.host.set_parent(v["config_path"], parent)
            self.log.log(NOTICE, f"VM {name}: parent_host set back to {parent} after the "
                                 "failed start")
        except (OSError, ValueError) as e:
            self.log.log(CRIT, f"cannot set parent_host of VM {name} back to {parent} after "
                               f"a failed start: {e}")
            ok = False
        absent_since = None
        while True:   # bounded: give_up
            now = time.monotonic()
            if os.path.exists(live):
                absent_since = None
                if now >= give_up:
                    return False
                self.log.warning(f"VM {name} appeared after its failed start: destroying it")
                ok = kill() and ok
                self.host.destroy_all([name], max(0.5, give_up - now))
                continue
            if absent_since is None:
                absent_since = now
            verdict = absence_verdict(now, absent_since, cfg.start_confirm, give_up)
            if verdict == "confirmed":
                return ok
            if verdict == "unknown":
                return False
            time.sleep(0.05)

    def resolve_starts(self):
        """Failed starts that could not be confirmed gone (Core.unresolved_starts): clean
        up again; once the VM is confirmed gone, the core turns the start into an ordinary
        failure and the manager places the VM again (inventory job, worker thread)."""
        with self.lock:
            pending = self.core.unresolved_starts()
        for uid in pending:
            item = self.unresolved.get(uid)
            if item is None:
                continue
            v, restore_parent, error = item
            if self.undo_start(v, restore_parent, error):
                self.unresolved.pop(uid, None)
                with self.lock:
                    self.core.finish_failover(uid, False, error + " (confirmed gone later)",
                                              time.monotonic())
                self.sync_incarnation()

    def fence_member(self, a):
        """Issue 13 item 5: run a member's fence command (fence_commands: it exits 0 only
        once that host is confirmed off), bounded by EXTERNAL_FENCE_TIMEOUT; never in
        debug mode."""
        argv = a["argv"]
        if self.debug:   # the core never asks in debug mode (FailoverManager.external_fences)
            return
        rc, out, err = run_cmd(argv, EXTERNAL_FENCE_TIMEOUT)
        ok = rc == 0
        detail = (f"{argv[0]} exited 0" if ok else
                  f"{argv[0]} did not return within {EXTERNAL_FENCE_TIMEOUT:g} s"
                  if rc is None else f"{argv[0]} exited {rc}: {command_text(out, err)}")
        with self.lock:
            self.core.fence_member_done(a["member"], a["startup_time"], ok, detail,
                                        time.monotonic())
        self.wake.set()

    def demote(self, vms, keep_live=False):
        """§3.6: carry out demotion_steps() on our copies of VMs moved away while we
        were gone (they become backups), then tell the core what was handled.  A
        rewrite that fails stops here: the core asks again, and we do not arm."""
        seen_at = time.monotonic()
        inventory, errors = self.host.inventory(snapshots=False)
        unavailable = unavailable_datasets(errors)
        local = {v["vm_name"]: v for v in inventory}
        say = "(DEBUG) would " if self.debug else ""
        done, deferred = {}, {}
        for name, parent, step in demotion_steps(local, vms, keep_live, unavailable):
            if step == "deferred":
                deferred[name] = parent
                continue
            if step == "keep":
                self.log.warning(f"VM {name} runs here, but a failover plan says it was moved "
                                 f"to {parent}: left running (the plan is older than its start "
                                 "here, or the cluster lost its guarantee: check by hand)")
            if step == "destroy":
                self.log.log(NOTICE, f"{say}destroy VM {name}: it was moved to {parent}")
                if not self.debug:
                    self.host.destroy_all([name], self.cfg.fence_timeout)
            if step in ("destroy", "demote"):
                self.log.log(NOTICE, f"{say}demote VM {name} to a backup (parent_host = "
                                     f"{parent})")
                if not self.debug:
                    try:
                        self.host.set_parent(local[name]["config_path"], parent)
                    except (OSError, ValueError) as e:
                        self.log.error(f"cannot demote VM {name}: {e}; not arming")
                        return
                self.events.append("rejoin_demoted", vm_name=name, new_parent=parent,
                                   debug=self.debug)
            done[name] = parent
        with self.lock:
            self.core.demote_done(done, deferred, unavailable, seen_at)

    def restore(self, vms):
        """Issue 11 item 2.2: carry out restore_steps() on the copies our fence locked while
        they were stopped and that the manager keeps here; a rewrite that failed is asked
        for again.  A copy not visible (a dataset unavailable again since the manager saw
        this host ready) keeps its lock, with a warning."""
        inventory, errors = self.host.inventory(snapshots=False)
        local = {v["vm_name"]: v for v in inventory}
        say = "(DEBUG) would " if self.debug else ""
        done, failed = [], []
        for name, step in restore_steps(local, vms, self.cfg.hostname):
            if step == "absent" and errors:    # (the manager waits for a ready host)
                self.log.warning(f"VM {name}: the cluster keeps it here, but no copy is "
                                 f"visible ({last_line(errors[0]['error'])}): its lock stays; "
                                 "set its parent_host back by hand once it is")
            if step == "skip":
                self.log.warning(f"VM {name}: the cluster keeps it here, but its copy runs or "
                                 f"names {local[name].get('parent_host')}: left as it is")
            if step == "restore":
                self.log.log(NOTICE, f"{say}unlock VM {name}: parent_host = "
                                     f"{self.cfg.hostname} (locked by the fence while stopped; "
                                     "it runs nowhere)")
                if not self.debug:
                    try:
                        self.host.set_parent(local[name]["config_path"], self.cfg.hostname)
                    except (OSError, ValueError) as e:
                        self.log.error(f"cannot unlock VM {name}: {e}")
                        failed.append(name)
                        continue
            done.append(name)
        with self.lock:
            self.core.restore_done(done, failed)


class AgentHost:
    """This host's companions and records: the ha_watchdog companion (§3.5), the
    inventory and readiness checks, the fence record, and the running and stopped
    records in state_dir (§3.6).

    A part of Agent (its fields: Agent's docstring)."""

    def start_watchdog(self):
        """Use the watchdog running for this run_dir, or start one and wait for its pid file."""
        pid = read_pid(self.paths.wd_pid)
        if pid is not None:
            if self.watchdog_mode() == self.mode:
                self.wd_pid = pid
                self.log.log(NOTICE, f"using the running ha_watchdog (PID {pid})")
                return
            self.log.log(NOTICE, f"the running ha_watchdog (PID {pid}) is not in {self.mode} "
                                 "mode: standing it down and starting a new one")
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                raise RuntimeError(f"ha_watchdog (PID {pid}) in another mode did not stop")
        argv = [sys.executable, watchdog_script(), "--config", self.cfg.path]
        env = dict(os.environ)
        env.pop("HOSTER_HA_BYTECODE", None)
        if BYTECODE is not None:   # it runs the code this agent runs, without compiling it
            env["HOSTER_HA_BYTECODE"] = BYTECODE
        if self.debug:
            argv.append("--ha-debug")
        # No inherited stdout/stderr: daemon(8) waits for EOF on its pipe before it exits.
        self.wd_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, close_fds=True,
                                        start_new_session=True, env=env)
        deadline = time.monotonic() + self.WATCHDOG_START_TIMEOUT
        while time.monotonic() < deadline:
            if read_pid(self.paths.wd_pid) == self.wd_proc.pid:
                self.wd_pid = self.wd_proc.pid
                self.log.log(NOTICE, f"started ha_watchdog (PID {self.wd_pid})")
                return
            if self.wd_proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"ha_watchdog did not start (no {self.paths.wd_pid}); "
                           "see the log for its error")

    def read_ack(self):
        try:
            with open(self.paths.wd_ack) as f:
                return f.read().split()
        except OSError:
            return []

    def watchdog_mode(self):
        ack = self.read_ack()
        return ack[2] if len(ack) == 3 else None

    def watchdog_alive(self):
        if self.wd_proc is not None and self.wd_proc.pid == self.wd_pid:
            return self.wd_proc.poll() is None  # reaps our child: no zombie
        return self.wd_pid is not None and pid_alive(self.wd_pid)

    def heartbeat(self, armed):
        """Tell the watchdog we are alive (SIGUSR1 armed, SIGHUP unarmed); read its ack."""
        try:
            os.kill(self.wd_pid, signal.SIGUSR1 if armed else signal.SIGHUP)
        except OSError:
            pass
        self.wd_armed_ack = self.read_ack() == ["armed", str(os.getpid()), self.mode]

    def check_watchdog(self):
        """The core's watchdog-gone rule on what we see of the companion (loop thread)."""
        alive = self.watchdog_alive()
        with self.lock:
            self.core.check_watchdog(alive, time.monotonic(), self.wd_restarting, self.wd_pid)
            actions = self.persist_now(self.core.take_actions())
        self.execute(actions)

    def restart_watchdog(self):
        try:
            self.start_watchdog()
        except (RuntimeError, OSError) as e:
            self.log.error(str(e))
        finally:
            self.wd_restarting = False

    def refresh_inventory(self):
        """Refresh the cached VM inventory in a worker thread (used by fencing)."""
        if self.inventory_busy:
            return
        self.inventory_busy = True

        def job():
            try:
                seen_at = time.monotonic()
                vms, errors = self.host.inventory(snapshots=False)   # issue 11 item 2.11
                self.inventory_cache = vms
                # an unavailable dataset is the core's to report (once per change); the
                # other errors are logged once per change too, not every inventory
                said = sorted(f"inventory: {e.get('vm_name') or e.get('dataset')}: "
                              f"{e['error']}" for e in errors if not e.get("unavailable"))
                if said != self.inventory_errors:
                    for line in said:
                        if line not in self.inventory_errors:
                            self.log.warning(line)
                    self.inventory_errors = said
                with self.lock:
                    self.core.set_datasets(unavailable_datasets(errors), seen_at)
                self.record_running(vms, seen_at)
                if self.unresolved:
                    self.resolve_starts()
            finally:
                self.inventory_busy = False
        self.pool.submit(job)

    def log_fence_record(self):
        """A host back from a fence says so first (issue 14 item 8): when, why, what it
        ran and what it locked (state_dir/fence.json, sent with register)."""
        try:
            with open(self.paths.fence, "rb") as f:
                rec = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self.log.error(f"{self.paths.fence} cannot be read ({e}); its VMs are not sent")
            return
        if not isinstance(rec, dict):
            return
        ts = rec.get("ts")
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts)) \
            if _is_number(ts) else "an unknown time"
        names = read_fence_file(self.paths.fence) or {"vms": [], "locked": []}
        self.log.log(NOTICE, f"this node fenced itself at {when}: {rec.get('reason', '?')}; "
                             f"it ran {', '.join(names['vms']) or 'no production VM'}, "
                             f"locked {', '.join(names['locked']) or 'none'}; the manager "
                             "places what runs nowhere, moved VMs are demoted here")

    def read_locked(self):
        """The VMs our fence locked while they were stopped (state_dir/fence.json's
        `locked` but not its `vms`), for `register` (issue 11 item 2.2)."""
        record = read_fence_file(self.paths.fence) or {}
        ran = set(record.get("vms") or []) | set(read_fence_record(self.paths.running))
        return sorted(v for v in record.get("locked") or [] if valid_vm_name(v) and v not in ran)

    def read_stopped(self):
        """The VMs of state_dir/stopped.json (an orderly stop's), for `register`; []
        without restart_after_stop (the file is then removed)."""
        if not self.cfg.restart_after_stop:
            remove_file(self.paths.stopped)
            return []
        names = read_fence_record(self.paths.stopped)
        if names:
            self.log.log(NOTICE, f"stopped in order with {', '.join(names)} running: asking "
                                 "the manager to start those that run nowhere again here")
        return names

    def remember_stopped(self):
        """Orderly stop (issue 14 item 5): state_dir/stopped.json := the production VMs
        that run here with this host as their parent, from a fresh inventory (else the
        last running record), so the next start hands them to the manager."""
        with self.lock:
            fenced = self.core.fenced
        if not self.cfg.restart_after_stop or fenced:
            return
        vms, errors = self.host.inventory(snapshots=False, budget=5.0)
        names = running_record_names(self.cfg.hostname, vms) if not errors else \
            sorted(set(running_record_names(self.cfg.hostname, vms)) |
                   set(self.running_record or []))
        try:
            if names:
                write_atomic(self.paths.stopped, (json.dumps(
                    {"ts": time.time(), "vms": names}) + "\n").encode(), mode=0o600)
                self.log.log(NOTICE, f"{self.paths.stopped}: {', '.join(names)} (started again "
                                     "on this host at the next start if they run nowhere)")
            else:
                remove_file(self.paths.stopped)
        except OSError as e:
            self.log.error(f"cannot write {self.paths.stopped}: {e}")

    def host_readiness(self):
        """Why this host cannot start VMs at all, [] if it can (issue 11 item 2.3):
        Hoster's init marker (every reboot empties /var/run) and vmm_dir (vmm.ko)."""
        reasons = []
        if not os.path.exists(self.cfg.hoster_init_file):
            reasons.append(f"Hoster not initialised (no {self.cfg.hoster_init_file}): "
                           "run hoster init")
        if not os.path.isdir(self.cfg.vmm_dir):
            reasons.append(f"no {self.cfg.vmm_dir} (vmm.ko not loaded): run hoster init")
        return reasons

    def check_host(self):
        """Every ping_interval, in a worker: are this host's VM datasets available (one
        `zfs get`)?  The core logs changes and, when a dataset comes back, asks for the
        deferred demotions at its next tick (before anything else)."""
        if self.host_check_busy:
            return
        self.host_check_busy = True

        def job():
            try:
                seen_at = time.monotonic()
                reasons = self.host_readiness()
                states = self.host.dataset_states(timeout=max(1.0, 4 * self.cfg.ping_interval))
                with self.lock:
                    self.core.set_host_readiness(reasons)
                    self.core.set_datasets({d: w for d, w in states.items() if w is not None},
                                           seen_at)
            finally:
                self.host_check_busy = False
        self.pool.submit(job)

    def record_running(self, vms, seen_at):
        """state_dir/running.json := what Core.running_record decides for a fresh
        inventory `vms`, begun at monotonic time seen_at (worker thread).  A failover
        start noted since then stays in: the inventory may have read the VM before it
        was live (or before its parent_host was rewritten)."""
        with self.running_lock:
            self.noted = {n: t for n, t in self.noted.items() if t >= seen_at}
            with self.lock:
                decision = self.core.running_record(vms, started=self.noted)
            self._apply_running(decision)

    def note_running(self, name):
        """A failover has just started VM `name` here: into running.json at once (the next
        inventory may be 10 s away, and a power loss may come first)."""
        with self.running_lock:
            old = self.running_record
            if old is None:
                old = read_fence_record(self.paths.running)
            with self.lock:
                decision = self.core.running_record(started=[name], old=old)
            self.noted[name] = time.monotonic()
            if decision is not None and decision[0] == "write":
                self._apply_running(decision)

    def _apply_running(self, decision):
        """Carry out a Core.running_record decision (running_lock held); nothing once the
        agent stops in order (the record is gone for good then)."""
        if self.running_closed or decision is None:
            return
        what, names = decision
        if what == "remove":
            if self.running_record is not None:
                remove_file(self.paths.running)
                self.running_record = None
            return
        if names == self.running_record:
            return
        try:
            write_atomic(self.paths.running, (json.dumps(
                {"ts": time.time(), "vms": names}) + "\n").encode(), mode=0o600)
            self.running_record = names
        except OSError as e:
            self.log.error(f"cannot write {self.paths.running}: {e}")


class Agent(AgentAPI, AgentTarget, AgentHost):
    """One node: HTTP server, ping rounds, control loop, fencing (SPEC §3).

    The agent owns threads, sockets, files and subprocesses; every decision is the
    core's (or a host-side rule's), and the agent never writes a core field: it calls
    core methods and executes their actions (execute).

    Threads: *loop* (run/loop: tick, heartbeat, check_watchdog, ping_round, execute,
    fence), *http* (one per request: api, vms, failover, maintenance, terminate),
    *ping* pool (exchange, the inventory refresh job), *work* pool (send, demote,
    restart_watchdog, leave_then_stop).  Fields, who writes them, what guards them:
      core               every thread; only with `lock` held (RLock).
      counters           http, ping: `lock` (count(), exchange).
      term_on_disk       loop, http: `lock` (persist_now is called with it held).
      running_record,    ping (record_running), http (note_running), loop (shutdown):
      running_closed       `running_lock`, taken before `lock` when both are needed.
      inventory_cache    http (vms, local_copy), ping (refresh job): no lock; one
                           reference assignment of a complete list, readers accept
                           an older one.
      inventory_busy     loop sets it, the ping job clears it: no lock (at worst two
                           refreshes overlap).
      host_check_busy,   like inventory_busy (check_host); inventory_errors: the ping
      inventory_errors     job only.
      unresolved         http (failover) adds, ping (resolve_starts) removes: no lock
                           (single dict operations; one entry per uid).
      wd_pid, wd_proc    loop (start), work (restart_watchdog): no lock; a restart
                           runs only while unarmed and one at a time (wd_restarting).
      wd_restarting      loop sets it (execute), work clears it: no lock.
      wd_armed_ack,      loop only.
      inflight
      leaving            loop sets it, work (leave_then_stop) clears it: no lock.
      stopping,          threading.Event.
      stop_requested
      wake               threading.Event: work (send) sets it after an answer, the loop
                           waits on it between ticks and clears it.
      cfg, paths, host, client, events, server, pool, work, nonces, startup_time:
                         set in __init__, never rebound (events, nonces lock inside).
    """

    ROUTES = {"register": {"POST"}, "ping": {"POST"}, "members": {"GET"}, "status": {"GET"},
              "vms": {"GET"}, "failover": {"POST"}, "plan": {"POST"}, "leave": {"POST"},
              "fenced": {"POST"}, "terminate": {"POST"}, "maintenance": {"POST"}}
    WATCHDOG_START_TIMEOUT = 10.0

    def __init__(self, cfg, log):
        self.cfg, self.log = cfg, log
        self.paths = Paths(cfg)
        self.debug = cfg.debug
        self.mode = "DEBUG" if cfg.debug else "PRODUCTION"
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        # set by a worker that handed the core an answer: the loop ticks at once, so the
        # sends that answer produced leave now, not a loop step later (issue 13 item 2)
        self.wake = threading.Event()
        self.nonces = NonceCache()
        self.client = Client(cfg)
        self.host = Host(cfg, log)
        self.events = EventLog(self.paths.events, cfg.hostname)
        self.counters = {"auth_failures": 0, "ping_failures": 0}
        self.notifier = Notifier(cfg.commands["notify"], cfg.hostname, log, self.count) \
            if cfg.commands.get("notify") else None
        self.inventory_cache = None
        self.inventory_busy = False
        self.inventory_errors = []
        self.host_check_busy = False
        self.wd_pid = None
        self.wd_proc = None
        self.wd_restarting = False
        self.wd_armed_ack = False
        self.inflight = {}
        self.unresolved = {}      # uid -> (copy, restore_parent, error) of unknown starts
        # max_parallel_starts: the commands of a start hold a slot, its confirmation not
        self.start_slots = threading.BoundedSemaphore(cfg.max_parallel_starts)
        self.stop_requested = threading.Event()
        self.leaving = False
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8,
                                                          thread_name_prefix="ha-ping")
        self.work = concurrent.futures.ThreadPoolExecutor(   # threads made as needed
            max_workers=MAX_PARALLEL_STARTS + 8, thread_name_prefix="ha-work")
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(cfg.run_dir, exist_ok=True)
        term = read_term(self.paths.term)
        p = self.paths
        if term is None and not any(os.path.exists(x) for x in (
                p.events, p.members, p.plans, p.fence, p.running, p.maintenance)):
            term = 0   # a new state_dir: no term file yet is no loss (SPEC §3.2, §4.5)
            write_atomic(p.term, b"0\n", mode=0o600)
        elif term is None:
            log.warning(f"{p.term} is missing although {cfg.state_dir} was used before: this "
                        "candidate votes only once it has learnt the other two candidates' "
                        "terms")
        self.term_on_disk = -1 if term is None else term
        self.startup_time = int(time.time() * 1000)
        self.core = Core(cfg, self.startup_time, time.monotonic(), persisted_term=term,
                         maintenance=os.path.exists(self.paths.maintenance),
                         fenced_vms=sorted(set(read_fence_record(self.paths.fence)) |
                                           set(read_fence_record(self.paths.running))),
                         stopped_vms=self.read_stopped(),
                         locked_vms=self.read_locked(),
                         members_state=read_state(p.members), plans_state=read_state(p.plans))
        self.running_record = None
        self.noted = {}      # {VM: when note_running put it in the record} (running_lock)
        self.running_lock = threading.Lock()
        self.running_closed = False
        ctx = server_ssl_context(cfg.tls) if cfg.tls else None
        self.server = Server((cfg.listen_address, cfg.port), Handler, self, ctx,
                             known=literal_addresses(c["address"] for c in cfg.candidates))

    # -- the manager's requests (work pool) --------------------------------------

    def send(self, a):
        status, answer = self.client.request(a["peer"], a["method"], a["name"], a["body"],
                                             timeout=a["timeout"])
        with self.lock:
            self.core.on_response(a["id"], status, answer, time.monotonic())
        self.wake.set()

    # -- ping rounds ---------------------------------------------------------------

    def ping_round(self, now):
        with self.lock:
            out = self.core.outgoing(now)
        for cand, kind, body in out:
            fut = self.inflight.get(cand)
            if fut is not None and not fut.done():
                continue  # the previous exchange is still out; it will count as failed
            self.inflight[cand] = self.pool.submit(self.exchange, cand, kind, body, now)

    def exchange(self, cand, kind, body, sent_at):
        status, answer = self.client.request(self.cfg.candidate(cand), "POST", kind, body,
                                             timeout=self.cfg.ping_timeout)
        now = time.monotonic()
        with self.lock:
            if kind == "ping":
                self.core.on_ping_result(cand, sent_at, status, answer, now)
            else:
                self.core.on_register_result(cand, status, answer, now)
            if not (status and 200 <= status < 300):
                self.counters["ping_failures"] += 1

    # -- the control loop ---------------------------------------------------------

    def execute(self, actions):
        """The one executor of the core's actions in production (Core.take_actions says
        what each kind means and in which order).  persist_term actions are normally
        gone by now (persist_now, under the lock); any left are written first."""
        for a in self.persist_now(actions):
            kind = a["kind"]
            if kind == "event":
                self.log.log(logging.getLevelName(a["level"]), a["msg"])
                if a["event"] in EVENT_NAMES:
                    self.events.append(a["event"], **a["details"])
                counter = EVENT_COUNTERS.get(a["event"])
                if counter:
                    self.count(counter)
                if self.notifier is not None and a["event"] in NOTIFY_EVENTS:
                    self.notifier.submit(a["event"], a["msg"], a["details"])
            elif kind == "send":
                self.work.submit(self.send, a)
            elif kind == "demote":
                self.work.submit(self.demote, a["vms"], a.get("keep_live", False))
            elif kind == "restore":
                self.work.submit(self.restore, a["vms"])
            elif kind == "fence_member":   # its own thread: it may take 60 s
                threading.Thread(target=self.fence_member, args=(a,), daemon=True,
                                 name="ha-fence-member").start()
            elif kind == "clear_fence_record":
                if not self.debug:   # the candidates have both (register)
                    remove_file(self.paths.fence)
                    remove_file(self.paths.stopped)
            elif kind == "record_running":
                self.refresh_inventory()           # rewrites running.json
            elif kind == "restart_watchdog":
                if not self.wd_restarting:
                    self.wd_restarting = True
                    self.work.submit(self.restart_watchdog)
            elif kind == "fence":
                self.fence(a["reason"])

    def tick(self):
        with self.lock:
            self.core.tick(time.monotonic(), watchdog_armed=self.wd_armed_ack)
            actions = self.persist_now(self.core.take_actions())  # before any ping answer
        self.execute(actions)

    def persist_now(self, actions=None):
        """Execute the persist_term and persist actions among `actions` (default: those
        the core holds): write state_dir/term (fsync) for a term above the one on disk,
        and state_dir/members.json, plans.json; return the other actions.  Called with
        self.lock held, so that no answer shows a term or acknowledges a change before
        it is on disk."""
        if actions is None:
            actions = self.core.take_persist()
        rest = []
        for a in actions:
            if a["kind"] == "persist":
                self.write_state(a)
            elif a["kind"] != "persist_term":
                rest.append(a)
            elif a["term"] > self.term_on_disk:
                write_atomic(self.paths.term, f"{a['term']}\n".encode(), mode=0o600)
                self.term_on_disk = a["term"]
        return rest

    def write_state(self, a):
        if a["file"] in ("members.json", "plans.json"):
            write_atomic(os.path.join(self.cfg.state_dir, a["file"]),
                         json.dumps(a["data"], sort_keys=True).encode(), mode=0o600)

    def fence(self, reason):
        """§3.3 steps 2-4 (the core has decided, and is `fenced`); the process never
        continues after this."""
        remove_file(self.paths.incarnation)   # the watchdog's fence after ours: no confirmation
        with self.lock:
            ours = self.core.fence_ours(set(self.host.running_vms()))
            # a start under way in a worker may still launch its VM: no confirmation then
            confirm = None if self.core.starting() else self.startup_time
        fence_host(self.cfg, self.host, self.log, reason, self.debug, self.inventory_cache,
                   ours, confirm)
        if self.debug:
            self.log.log(NOTICE, "(DEBUG) exiting with status 1 to simulate the failure")
        remove_file(self.paths.pid, only_if_pid=os.getpid())
        logging.shutdown()
        os._exit(1)

    def run(self):
        cfg = self.cfg
        write_pid_file(self.paths.pid)
        self.sync_incarnation()
        write_atomic(self.paths.mode, b"DEBUG\n" if self.debug else b"PRODUCTION\n", mode=0o644)
        signal.signal(signal.SIGTERM, lambda *_: self.stop_requested.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_requested.set())
        try:
            self.start_watchdog()
        except (RuntimeError, OSError) as e:
            self.log.error(str(e))
            remove_file(self.paths.pid, only_if_pid=os.getpid())
            return 1
        mode = self.mode
        self.log.log(NOTICE, f"hoster_ha {__version__} started on {cfg.hostname} as "
                             f"{'candidate' if cfg.is_candidate else 'worker'}, {mode} mode, "
                             f"listening on {cfg.listen_address}:{cfg.port}")
        if not self.debug and not cfg.kernel_watchdog:
            self.log.warning("kernel_watchdog is off: a whole-host stall is not covered "
                             "(only the two processes watch each other)")
        self.log_fence_record()
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="ha-http", daemon=True).start()
        self.loop()
        return self.shutdown()

    def loop(self):
        """The control loop: ticks, ping rounds, heartbeats; returns when asked to stop."""
        cfg = self.cfg
        step = min(0.25, cfg.ping_interval / 8)
        inventory_every = max(10.0, 5 * cfg.ping_interval)
        next_round = next_inventory = time.monotonic()
        while not self.stopping.is_set():
            if self.stop_requested.is_set() and not self.leaving:
                self.leaving = True  # SIGTERM: leave first, in a worker; the loop goes on
                self.work.submit(self.leave_then_stop)
            now = time.monotonic()
            if now >= next_round:
                next_round = max(next_round + cfg.ping_interval, now)
                with self.lock:
                    arming = self.core.arming
                self.heartbeat(arming)
                self.check_watchdog()
                self.ping_round(now)
                self.check_host()
            if now >= next_inventory:
                next_inventory = now + inventory_every
                self.refresh_inventory()
            self.tick()
            self.wake.wait(max(0.0, min(step, next_round - time.monotonic())))
            self.wake.clear()

    def shutdown(self):
        """Orderly exit: stand the watchdog down (SIGTERM), remove pid files."""
        self.log.log(NOTICE, "stopping: standing the watchdog down")
        if self.wd_pid is not None and self.watchdog_alive():
            try:
                os.kill(self.wd_pid, signal.SIGTERM)
            except OSError:
                pass
            deadline = time.monotonic() + 5
            while self.watchdog_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        with self.running_lock:  # orderly: our VMs keep running, unprotected
            self.running_closed = True
            remove_file(self.paths.running)
        self.remember_stopped()
        self.server.shutdown()
        self.server.server_close()
        self.pool.shutdown(wait=False)
        self.work.shutdown(wait=False)
        remove_file(self.paths.pid, only_if_pid=os.getpid())
        self.log.log(NOTICE, "hoster_ha stopped")
        return 0


# =============================================================================
# 5b. Host checks: what start, check-config and doctor verify on this host
#
# Each check returns a Check: ok True (passed), False (failed; `fix` says what to do)
# or None (skipped, with the reason).  Every host path read here comes from the config
# (hoster_config_dir, hoster_init_file, vmm_dir, run_dir) or a host command, so tests
# point them at fakes.
# =============================================================================

SYSLOG_SOCKETS = ("/var/run/log", "/dev/log")  # the sockets setup_logging() tries
CLOCK_LIMIT = 10.0  # s: a larger offset to a candidate fails doctor (requests: ±60 s)


class Check:
    MARKS = {True: "✓", False: "✗", None: "–"}

    def __init__(self, name, ok, detail, fix=None):
        self.name, self.ok, self.detail, self.fix = name, ok, detail, fix

    def line(self):
        text = f"{self.MARKS[self.ok]} {self.name}: {self.detail}"
        return text + (f" — fix: {self.fix}" if self.ok is False and self.fix else "")

    def refusal(self):
        """One line for `start` / `check-config` to refuse with."""
        return f"{self.name}: {self.detail}" + (f"; {self.fix}" if self.fix else "")

    def as_dict(self):
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def check_identity(cfg):
    """Our hostname must be the kernel's: Hoster compares parent_host with kern.hostname."""
    argv = cfg.command("hostname")
    rc, out, err = run_cmd(argv, 10)
    name = out.strip()
    if rc != 0 or not name or "\n" in name:
        return Check("hostname", False, f"cannot read the kernel's hostname ({' '.join(argv)}: "
                                        f"exit {rc}: {last_line(err or out) or 'no output'})",
                     "fix commands.hostname in the config")
    if name != cfg.hostname:
        return Check("hostname", False,
                     f"hostname {cfg.hostname!r} in {cfg.path} is not the kernel's hostname "
                     f"{name!r} ({' '.join(argv)}), the name Hoster compares parent_host with",
                     f"set \"hostname\": \"{name}\" (or remove the key), or rename the host")
    return Check("hostname", True, f"{name} (the kernel's hostname, as Hoster sees it)")


def check_hoster_ha(cfg):
    """Hoster's own HA (restapi_config.json ha_mode) must be off: two HA systems would
    lock, start and fence the same VMs."""
    path = cfg.hoster_file("restapi_config.json")
    if path is None:
        return Check("Hoster's HA", True, "off (no restapi_config.json in "
                     f"{cfg.hoster_config_dir or ', '.join(HOSTER_CONFIG_DIRS)})")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return Check("Hoster's HA", True, f"off: {path} cannot be read ({str(e)[:100]}), so "
                                          "Hoster's REST API cannot run with it either")
    if isinstance(data, dict) and data.get("ha_mode") is True:
        return Check("Hoster's HA", False,
                     f"Hoster's own HA is enabled (ha_mode: true in {path}): two HA systems "
                     "would act on the same VMs",
                     f"set \"ha_mode\": false in {path} and restart Hoster's REST API")
    return Check("Hoster's HA", True, f"off (ha_mode is not true in {path})")


def check_port(cfg):
    """The agent's port must be free (Hoster's REST API listens on 3000 by default)."""
    pid = read_pid(Paths(cfg).pid)
    if pid is not None:
        return Check("port", True, f"{cfg.port} is in use by this agent (PID {pid})")
    family = socket.AF_INET6 if ":" in cfg.listen_address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent's server
        s.bind((cfg.listen_address, cfg.port))
        s.listen(1)
    except OSError as e:
        where = f"{cfg.listen_address}:{cfg.port}"
        if e.errno == errno.EADDRINUSE:
            hoster = " (Hoster's REST API listens on 3000 by default)" if cfg.port == 3000 else ""
            return Check("port", False, f"port {cfg.port} is taken ({where}: another process "
                                        f"listens there){hoster}",
                         f"choose a free port for every node (\"port\" of the candidates and "
                         f"workers); sockstat -l -p {cfg.port} shows who has it")
        return Check("port", False, f"cannot listen on {where}: {e.strerror or e}",
                     "check listen_address and port")
    finally:
        s.close()
    return Check("port", True, f"{cfg.port} is free on {cfg.listen_address}")


def check_kernel_watchdog(cfg, make_kernel=None):
    """With kernel_watchdog: watchdogd(8) not running, and watchdog(4) arms and disarms.
    Not probed while our ha_watchdog runs: the probe would disarm the armed device."""
    name = "kernel watchdog"
    if not cfg.kernel_watchdog:
        return Check(name, None, "kernel_watchdog is off (a whole-host stall is not covered)")
    wd = read_pid(Paths(cfg).wd_pid)
    if wd is not None:
        return Check(name, True, f"in use by ha_watchdog (PID {wd}); not probed")
    if make_kernel is None:
        def make_kernel(cfg):
            return KernelWatchdog(
                cfg.watchdog_timeout, logging.getLogger("hoster_ha.checks"),
                watchdogd_pidfile=os.path.join(cfg.run_dir, WATCHDOGD_PID))
    kernel = make_kernel(cfg)
    try:
        kernel.check()
    except RuntimeError as e:
        return Check(name, False, str(e))
    return Check(name, True, f"{kernel.device} works (armed for a test with "
                             f"{kernel.seconds:g} s, then disarmed)")


def preflight(cfg, make_kernel=None):
    """The host checks `start` and `check-config` refuse on (SPEC-level: README, hoster_ha.8)."""
    checks = [check_identity(cfg), check_hoster_ha(cfg), check_port(cfg)]
    if not cfg.debug:  # in debug mode ha_watchdog never arms watchdog(4)
        checks.append(check_kernel_watchdog(cfg, make_kernel))
    return checks


def refusals(cfg, checks):
    """(lines that refuse, lines that only warn).  In debug mode only a port that cannot be
    bound refuses (the agent could not run at all); the rest is a warning."""
    bad = [c for c in checks if c.ok is False]
    if not cfg.debug:
        return [c.refusal() for c in bad], []
    return ([c.refusal() for c in bad if c.name == "port"],
            [c.refusal() for c in bad if c.name != "port"])


def check_python():
    """The interpreter named on our first line (make install writes INSTALL_PYTHON there)."""
    script = os.path.realpath(__file__)
    try:
        with open(script, encoding="utf-8", errors="replace") as f:
            first = f.readline().strip()
    except OSError as e:
        return Check("python", False, f"cannot read {script}: {e.strerror}")
    argv = first[2:].split() if first.startswith("#!") else []
    if argv[:1] == ["/usr/bin/env"] and len(argv) == 2:
        interp = shutil.which(argv[1]) or argv[1]
    else:
        interp = argv[0] if argv else sys.executable
    fix = "pkg install python3 (only that package creates /usr/local/bin/python3)"
    if not (os.path.isfile(interp) and os.access(interp, os.X_OK)):
        return Check("python", False, f"{interp}, named on the first line of {script}, does "
                                      "not exist", fix)
    rc, out, err = run_cmd([interp, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           10)
    version = out.strip()
    if rc != 0 or not re.fullmatch(r"\d+\.\d+", version):
        return Check("python", False, f"{interp} does not run ({last_line(err) or rc})", fix)
    if tuple(int(x) for x in version.split(".")) < (3, 9):
        return Check("python", False, f"{interp} is Python {version}; 3.9 or later is needed",
                     fix)
    return Check("python", True, f"{interp} (Python {version})")


def check_secret(path):
    """The secret must not be readable by group or others, wherever it is."""
    name = "secret"
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        mode = os.stat(path).st_mode & 0o777
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return Check(name, None, "skipped: the config cannot be read")
    if not isinstance(data, dict):
        return Check(name, None, "skipped: the config is not a JSON object")
    secret_file = data.get("secret_file")
    if isinstance(secret_file, str) and secret_file:
        try:
            fmode = os.stat(secret_file).st_mode & 0o777
        except OSError as e:
            return Check(name, False, f"secret_file {secret_file}: {e.strerror}",
                         f"hoster_ha.py gen-secret > {secret_file}; chmod 600 {secret_file} "
                         "(the same secret on every host)")
        if fmode & 0o077:
            return Check(name, False, f"{secret_file} is mode {fmode:o}: group or others can "
                                      "read it", f"chmod 600 {secret_file}")
        return Check(name, True, f"{secret_file} is mode {fmode:o}")
    if "secret" in data:
        if mode & 0o077:
            return Check(name, False, f"the secret is written in {path}, which group or others "
                                      f"can read (mode {mode:o})",
                         f"chmod 600 {path}, or move the secret to a secret_file")
        return Check(name, True, f"in {path} (mode {mode:o})")
    return Check(name, False, "no secret or secret_file in the config",
                 "hoster_ha.py gen-secret > /usr/local/etc/hoster_ha/secret; chmod 600 it; "
                 "set secret_file")


def check_hoster_init(cfg):
    """`hoster init` (after every reboot) writes the init marker and loads vmm.ko."""
    missing = [p for p in (cfg.hoster_init_file, cfg.vmm_dir) if not os.path.exists(p)]
    if missing:
        return Check("Hoster initialised", False, f"no: {' and '.join(missing)} missing",
                     "zfs mount -a -l, then hoster init (both after every reboot)")
    return Check("Hoster initialised", True, f"yes ({cfg.hoster_init_file} and {cfg.vmm_dir} "
                                             "exist)")


def check_datasets(cfg):
    """One check per VM dataset: it exists, is mounted and its key is loaded."""
    checks = [Check("VM datasets", True, f"{', '.join(cfg.vm_datasets) or 'none'} "
                                         f"({cfg.vm_datasets_source})")]
    for ds in cfg.vm_datasets:
        name = f"dataset {ds}"
        argv = cfg.commands["zfs"] + ["get", "-H", "-p", "-o", "name,property,value",
                                      "mounted,keystatus", ds]
        rc, out, err = run_cmd(argv, 30)
        if rc != 0:
            checks.append(Check(name, False, f"zfs get failed (exit {rc}): "
                                             f"{last_line(err or out) or 'no output'}",
                                "check vm_datasets (or Hoster's active_datasets): zfs list"))
            continue
        props = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0] == ds:
                props[parts[1]] = parts[2]
        mounted, key = props.get("mounted"), props.get("keystatus", "-")
        if key == "unavailable":
            checks.append(Check(name, False, "locked (keystatus unavailable): its VMs are "
                                             "invisible", "zfs mount -a -l (asks for the "
                                                          "passphrase), then hoster init"))
        elif mounted != "yes":
            checks.append(Check(name, False, f"not mounted (mounted {mounted or 'unknown'}): "
                                             "its VMs are invisible", "zfs mount -a -l"))
        else:
            checks.append(Check(name, True, "mounted, " + ("key loaded" if key == "available"
                                                           else "not encrypted")))
    return checks


def check_syslog():
    """A syslog socket that accepts a datagram, as setup_logging() needs."""
    errors = []
    for path in SYSLOG_SOCKETS:
        if not os.path.exists(path):
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.connect(path)
        except OSError as e:
            errors.append(f"{path}: {e.strerror or e}")
            continue
        finally:
            s.close()
        return Check("syslog", True, f"{path} accepts messages")
    return Check("syslog", False, "no syslog socket accepts messages ("
                 + ("; ".join(errors) or f"none of {', '.join(SYSLOG_SOCKETS)} exists") + ")",
                 "service syslogd start (until then only log_file, if set, has the lines)")


def clock_offset(cfg, cand, timeout=3.0):
    """(seconds the candidate's clock is ahead of ours, None) from the Date of its signed
    answer to GET status, or (None, error).  Date has whole seconds: ±0.5 s plus half the
    round trip."""
    target = API + "status"
    headers = signed_headers(cfg.secret, "GET", target, b"")
    if cand["protocol"] == "https":
        conn = _HTTPSConnection(cand["address"], cand["port"], [cand["hostname"], cand["address"]],
                                timeout=timeout, context=client_ssl_context(cfg.tls))
    else:
        conn = http.client.HTTPConnection(cand["address"], cand["port"], timeout=timeout)
    try:
        t0 = time.time()
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        raw = resp.read(MAX_ANSWER + 1)
        t1 = time.time()
        if not hmac.compare_digest(resp.getheader("X-HA-Answer-Signature") or "", sign_answer(
                cfg.secret, cand["hostname"], headers["X-HA-Signature"], resp.status, raw)):
            return None, "the answer is not signed by its agent (another service on that port?)"
        date = email.utils.parsedate_to_datetime(resp.getheader("Date") or "")
        return date.timestamp() + 0.5 - (t0 + t1) / 2, None
    except (OSError, http.client.HTTPException, TypeError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def check_clocks(cfg, offset=clock_offset):
    if read_pid(Paths(cfg).pid) is None:
        return [Check("clock offset", None, "skipped: the agent is not running here (start it "
                                            "and the candidates, then run doctor again)")]
    checks = []
    for cand in cfg.candidates:
        if cand["hostname"] == cfg.hostname:
            continue
        name = f"clock offset to {cand['hostname']}"
        off, error = offset(cfg, cand)
        if error:
            checks.append(Check(name, False, f"no answer ({error})",
                                "check that its agent runs and the network between us"))
        elif abs(off) >= CLOCK_LIMIT:
            checks.append(Check(name, False, f"{off:+.1f} s (more than {CLOCK_LIMIT:g} s; "
                                             f"requests are refused beyond "
                                             f"±{SIGNATURE_WINDOW} s)",
                                "run ntpd on every host (sysrc ntpd_enable=YES; service ntpd "
                                "start)"))
        else:
            checks.append(Check(name, True, f"{off:+.1f} s (±0.5 s)"))
    return checks


def doctor(path, make_kernel=None, offset=clock_offset):
    """Every check of this host, in order; [Check].  Runs whatever the config allows."""
    checks = [check_python()]
    try:
        cfg = load_config(path)
    except ConfigError as e:
        checks += [Check("config", False, str(e), "edit the file (check-config says the same)"),
                   check_secret(path), check_syslog(),
                   Check("the other checks", None, "skipped: they need a valid config")]
        return checks
    role = "candidate" if cfg.is_candidate else "worker"
    checks += [Check("config", True, f"{cfg.path} ({cfg.hostname} is a {role})"),
               check_secret(path), check_identity(cfg), check_hoster_init(cfg)]
    checks += check_datasets(cfg)
    checks += [check_port(cfg), check_hoster_ha(cfg), check_syslog(),
               check_kernel_watchdog(cfg, make_kernel)]
    return checks + check_clocks(cfg, offset)


# =============================================================================
# 6. CLI
# =============================================================================

def die(msg, status):
    print(f"hoster_ha: {msg}", file=sys.stderr)
    return status


def local_request(cfg, name, timeout=3.0, body=None):
    """GET (or POST, with a body) one of our own agent's endpoints.

    (status, answer) or (None, error)."""
    address = cfg.address
    if cfg.listen_address in ("127.0.0.1", "::1"):
        address = cfg.listen_address
    return Client(cfg).request({"address": address, "port": cfg.port, "protocol": cfg.protocol},
                               "GET" if body is None else "POST", name, body, timeout=timeout)


def answer_text(answer):
    return answer.get("error") or answer.get("message") if isinstance(answer, dict) else answer


def cmd_start(cfg, args):
    paths = Paths(cfg)
    pid = read_pid(paths.pid)
    if pid is not None:
        return die(f"already running as PID {pid} ({paths.pid}); "
                   "use 'hoster_ha.py stop' first", 1)
    refuse, warn = refusals(cfg, preflight(cfg))
    for line in warn:
        print(f"hoster_ha: warning (debug mode): {line}", file=sys.stderr)
    if refuse:
        for line in refuse:
            print(f"hoster_ha: cannot start: {line}", file=sys.stderr)
        return 2
    if args.foreground:
        return run_agent(cfg, stderr=sys.stderr.isatty())
    child = os.fork()
    if child == 0:  # first child: new session, fork again, run detached
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        fd = os.open(os.devnull, os.O_RDWR)
        for n in (0, 1, 2):
            os.dup2(fd, n)
        os._exit(run_agent(cfg, stderr=False))
    os.waitpid(child, 0)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if read_pid(paths.pid) and read_pid(paths.wd_pid):
            status, _ = local_request(cfg, "status", timeout=1.0)
            if status == 200:
                return cmd_status(cfg, args)
        time.sleep(0.1)
    cmd_status(cfg, args)
    return die(f"the agent did not come up within 15 s; see syslog"
               f"{' and ' + cfg.log_file if cfg.log_file else ''}", 1)


SYSTEM_PATH = ("/sbin", "/bin", "/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin",
               "/opt/hoster-core")


# Run by the agent's process in place of this file (run_as_import), with the arguments
# SCRIPT PYC ARGS...: load the module from the bytecode PYC only (nothing else is looked up
# differently; the current directory is not on sys.path) and run its main() with ARGS.
IMPORT_SELF = """import os, sys
from importlib.machinery import SourcelessFileLoader
from importlib.util import module_from_spec, spec_from_loader
HOSTER_HA_PROGRAM = True
script, pyc = sys.argv[1:3]
sys.argv = [script] + sys.argv[3:]
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
loader = SourcelessFileLoader("hoster_ha", pyc)
mod = module_from_spec(spec_from_loader("hoster_ha", loader))
mod.__file__ = script
sys.modules["hoster_ha"] = mod
loader.exec_module(mod)
mod.BYTECODE = pyc
sys.exit(mod.main())
"""
BYTECODE = None   # the bytecode this process runs (IMPORT_SELF sets it): its watchdog's too


def private_path(path, kind):
    """path is a `kind` (stat.S_ISDIR or S_ISREG), not a symlink, owned by us and
    writable by nobody else: bytecode we run as root comes only from such a place."""
    st = os.lstat(path)
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def compiled_self(state_dir):
    """(script, pyc): this file and its bytecode state_dir/pycache/hoster_ha.TAG.pyc,
    written unless what is there was compiled from the file as it is now (a checked-hash
    pyc: its header holds the source's hash).  None (the caller runs as it is) when
    state_dir or pycache/ is writable by another user or is not ours, or on any error."""
    import importlib.util
    import py_compile
    import stat
    script = os.path.realpath(__file__)
    prefix = os.path.join(state_dir, "pycache")
    pyc = os.path.join(prefix, f"hoster_ha.{sys.implementation.cache_tag}.pyc")
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.makedirs(prefix, mode=0o700, exist_ok=True)
        if not (private_path(state_dir, stat.S_ISDIR) and private_path(prefix, stat.S_ISDIR)):
            return None
        with open(script, "rb") as f:
            want = importlib.util.MAGIC_NUMBER + struct.pack("<I", 0b11) + \
                importlib.util.source_hash(f.read())
        try:
            with open(pyc, "rb") as f:
                fresh = f.read(16) == want and private_path(pyc, stat.S_ISREG)
        except OSError:
            fresh = False
        if not fresh:
            py_compile.compile(script, cfile=pyc, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
            if not private_path(pyc, stat.S_ISREG):
                return None
        return script, pyc
    except (OSError, py_compile.PyCompileError, ValueError):
        return None


def run_as_import(cfg):
    """The agent is a long-running process: run as a script, Python compiled this whole
    file first, and what that took stays in the process (about 13 MiB of its RSS).  So
    the process that runs the agent replaces itself (exec: same PID) by one that loads
    this module from its bytecode in state_dir/pycache (compiled_self).  Returns only if
    that cannot be done: the agent then runs as it is."""
    if __name__ != "__main__" or not sys.executable:
        return
    got = compiled_self(cfg.state_dir)
    if got is None:
        return
    flags = subprocess._args_from_interpreter_flags()   # -S, -E, -X ... as we were run
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *flags, "-c", IMPORT_SELF, *got,
                                  *sys.argv[1:]])
    except OSError:
        return


def run_agent(cfg, stderr):
    run_as_import(cfg)
    # rc.d runs us with PATH=/sbin:/bin:/usr/sbin:/usr/bin; `hoster` lives elsewhere.  The
    # standard folders are appended, so whatever PATH already had (test fakes) comes first.
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([p for p in path if p] +
                                         [p for p in SYSTEM_PATH if p not in path])
    log = setup_logging(cfg, "hoster_ha", stderr=stderr)
    log.log(logging.WARNING if cfg.vm_datasets_warn else NOTICE,
            f"VM datasets: {', '.join(cfg.vm_datasets) or 'none'} ({cfg.vm_datasets_source})")
    try:
        agent = Agent(cfg, log)
    except (OSError, RuntimeError) as e:
        log.error(f"cannot start: {e}")
        print(f"hoster_ha: cannot start: {e}", file=sys.stderr)
        return 1
    return agent.run()


def cmd_stop(cfg, args):
    paths = Paths(cfg)
    pid = read_pid(paths.pid)
    if pid is None:
        wd = read_pid(paths.wd_pid)
        if wd is not None:  # a watchdog left alone: stand it down
            os.kill(wd, signal.SIGTERM)
        print("hoster_ha is not running")
        return 0
    status, answer = local_request(cfg, "terminate", timeout=15.0, body={})
    if status != 200:
        why = answer_text(answer) if status else f"the agent does not answer ({answer})"
        return die(f"{why}; not stopped. (kill -TERM {pid} makes it retry the leave; an "
                   "unarmed node then stops anyway)", 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            print(f"hoster_ha stopped (was PID {pid}); {answer_text(answer)}")
            return 0
        time.sleep(0.1)
    return die(f"PID {pid} did not exit within 20 s after leaving the cluster", 1)


def cmd_maintenance(cfg, args):
    if read_pid(Paths(cfg).pid) is None:
        return die("the agent is not running", 1)
    on = args.state == "on"
    status, answer = local_request(cfg, "maintenance", timeout=30.0, body={"on": on})
    if status != 200:
        return die(f"maintenance {args.state}: {answer_text(answer)}", 1)
    print(f"maintenance {args.state}" + (": this node is disarmed and will not be failed over"
                                         if on else ": the node arms again by the normal rule"))
    return 0


def cmd_terminate(cfg, args):
    """Orderly stop of every member (workers first, this candidate last), each leaving."""
    if not cfg.is_candidate:
        return die("terminate runs on a candidate (this node is a worker)", 2)
    answer, error = fetch_members(cfg)
    if error:
        return die(error, 1)
    members = [m for m in answer["members"] if not m["left"]]
    order = sorted(members, key=lambda m: (m["hostname"] == cfg.hostname,
                                           m["hostname"] in cfg.candidate_names, m["hostname"]))
    client, failed = Client(cfg), 0
    for m in order:
        if m["silence"] >= m["failover_time"]:
            print(f"{m['hostname']}: skipped: silent for {m['silence']:.0f} s (failed)")
            continue
        status, ans = client.request(m, "POST", "terminate", {}, timeout=15.0)
        ok = status == 200
        failed += not ok
        print(f"{m['hostname']}: {'stopped' if ok else 'NOT stopped'}: "
              f"{answer_text(ans) if status else ans}")
    return 0 if not failed else 1


def status_data(cfg):
    paths = Paths(cfg)
    api_pid, wd_pid = read_pid(paths.pid), read_pid(paths.wd_pid)
    try:
        with open(paths.mode) as f:
            mode = f.read().strip() or None
    except OSError:
        mode = None
    st = {"hostname": cfg.hostname, "role": "candidate" if cfg.is_candidate else "worker",
          "manager": None, "term": 0, "reachable_candidates": [], "armed": False,
          "maintenance": os.path.exists(paths.maintenance), "mode": mode,
          "api_pid": api_pid, "watchdog_pid": wd_pid}
    error = None
    if api_pid is not None:
        status, answer = local_request(cfg, "status")
        if status == 200 and isinstance(answer, dict):
            st.update(answer)
            st["api_pid"], st["watchdog_pid"] = api_pid, wd_pid
        else:
            error = answer.get("error") if isinstance(answer, dict) else answer
    return st, error


def cmd_status(cfg, args):
    st, error = status_data(cfg)
    if getattr(args, "json", False):
        if error:
            st["error"] = str(error)
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0 if st["api_pid"] else 1
    lines = [f"🟢 API Server is running as PID {st['api_pid']}" if st["api_pid"]
             else "🔴 API Server IS NOT running",
             f"🟢 HA Watchdog service is running as PID {st['watchdog_pid']}"
             if st["watchdog_pid"] else "🔴 HA Watchdog service IS NOT running"]
    if st["api_pid"]:
        lines.append("")
        lines.append("🤖 HA is running in DEBUG mode" if st["mode"] == "DEBUG"
                     else "🚀 HA is running in PRODUCTION mode")
        lines.append("🔶 BE CAREFUL! This system is running as a part of the HA. "
                     "Changes applied here, may affect other cluster members.")
        lines.append("")
        if error:
            lines.append(f"Cluster state: unavailable ({error})")
        else:
            reach = st["reachable_candidates"]
            lines += [f"Hostname: {st['hostname']}",
                      f"Role: {st['role']}",
                      f"Manager: {st['manager'] or 'none'}"
                      + (f" (term {st['term']})" if st["manager"] else ""),
                      f"Reachable candidates: {len(reach)} of 3"
                      + (f" ({', '.join(reach)})" if reach else ""),
                      f"Armed: {'yes' if st['armed'] else 'no'}",
                      f"Maintenance: {'on' if st['maintenance'] else 'off'}"]
            if st.get("state") in Link.LIFECYCLE:
                lines.append(f"State: {st['state']} ({Link.LIFECYCLE[st['state']]})")
            lines += status_details(st)
    print("\n".join(lines))
    return 0 if st["api_pid"] else 1


def _ago(seconds):
    if not _is_number(seconds):
        return "?"
    s = int(seconds)
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


def status_details(st):
    """The cluster view below `status`'s own lines (issue 14 item 7): quorum, where the
    manager is and for how long, the member table (candidates), the VMs running here."""
    lines = []
    reach = st.get("reachable_candidates") or []
    margin = st.get("survival_margin_s")
    lines.append(f"Quorum: {'yes' if len(reach) >= 2 else 'NO'}"
                 + (f" (survival margin {margin:.0f} s)" if _is_number(margin) else "")
                 + ("; WARNING: one more lost candidate fences this node"
                    if st.get("approaching_fence") else ""))
    if st.get("manager") and _is_number(st.get("manager_for_s")):
        lines.append(f"Manager since: {_ago(st['manager_for_s'])} ago (as seen here)")
    vms = st.get("vms_running")
    if vms is not None:
        lines.append(f"VMs: {len(vms)} production VM(s) running here"
                     + (f" ({', '.join(vms)})" if vms else ""))
    prot = st.get("protection")
    if isinstance(prot, dict):
        bad = prot.get("unprotected") or {}
        lines.append(f"Protection: {prot.get('checked', 0) - len(bad)} production VM(s) "
                     f"protected, {len(bad)} not"
                     + (" (" + ", ".join(f"{vm}: {why}" for vm, why in bad.items()) + ")"
                        if bad else ""))
    lines += host_lines(st)
    members = st.get("members")
    if members:
        lines += ["", "Members:"]
        rows = [("HOSTNAME", "ROLE", "STATE", "ARMED", "MAINT", "READY", "LAST SEEN")]
        for m in members:
            rows.append((m["hostname"], m["role"], m["state"], "yes" if m["armed"] else "no",
                         "yes" if m["maintenance"] else "no", _ready_text(m),
                         f"{_ago(m['last_seen_s'])} ago"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                  for r in rows]
    elif st.get("role") == "worker":
        lines.append("Members: ask a candidate (this is a worker; `members` asks one)")
    return lines


def host_lines(h):
    """What keeps this host from being complete (issue 11 items 2.1, 2.3): readiness,
    datasets unavailable and demotions waiting for them; status prints these."""
    lines = []
    if isinstance(h.get("ready"), bool):
        lines.append("Ready: yes" if h["ready"] else
                     "Ready: NO (" + "; ".join(h.get("not_ready") or []) + ")")
    unavail = h.get("datasets_unavailable") or {}
    pending = h.get("demotion_pending") or {}
    if isinstance(unavail, dict) and unavail:
        lines.append("Datasets: " + "; ".join(f"{ds} UNAVAILABLE ({why})"
                                              for ds, why in sorted(unavail.items()))
                     + ": its VMs are invisible here")
    elif "datasets_unavailable" in h:
        lines.append("Datasets: all available")
    if isinstance(pending, dict) and pending:
        lines.append("Demotion pending: " + ", ".join(
            f"{vm} (moved to {p})" for vm, p in sorted(pending.items()))
            + (": waits for the dataset; do not run `hoster vm start-all` yet" if unavail
               else ""))
    elif "demotion_pending" in h:
        lines.append("Demotions: done")
    return lines


def _ready_text(m):
    r = m.get("ready")
    return "yes" if r is True else "-" if r is None else \
        "NO: " + "; ".join(m.get("not_ready") or ["?"])


def fetch_members(cfg):
    """GET members from this candidate, or from the first candidate that answers."""
    sources = [cfg.hostname] if cfg.is_candidate else cfg.candidate_names
    client, error = Client(cfg), None
    for name in sources:
        status, answer = client.request(cfg.candidate(name), "GET", "members", timeout=3.0)
        if status == 200 and isinstance(answer, dict) and isinstance(answer.get("members"), list):
            return answer, None
        error = f"{name}: {answer.get('error') if isinstance(answer, dict) else answer}"
    return None, f"no candidate answered 'members' ({error})"


def print_table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_members(cfg, args):
    answer, error = fetch_members(cfg)
    if error:
        return die(error, 1)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    rows = [("HOSTNAME", "ADDRESS", "PORT", "SILENCE", "ARMED", "MAINT", "LEFT", "BACKUP",
             "READY")]
    for m in answer["members"]:
        rows.append((m["hostname"], m["address"], str(m["port"]), f"{m['silence']:.1f}s",
                     "yes" if m["armed"] else "no", "yes" if m["maintenance"] else "no",
                     "yes" if m["left"] else "no", "yes" if m["backup_node"] else "no",
                     _ready_text(m)))
    print(f"membership as seen by candidate {answer['hostname']}:")
    print_table(rows)
    return 0


def cmd_vms(cfg, args):
    """Cluster-wide VM view: where each VM runs, which hosts hold replicas, newest snapshots."""
    answer, error = fetch_members(cfg)
    if error:
        return die(error, 1)
    members = [m for m in answer["members"] if not m["left"]]
    client = Client(cfg)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(members))) as ex:
        futs = {m["hostname"]: ex.submit(client.request, m, "GET", "vms", None, 30.0)
                for m in members}
    hosts, vms, errors = {}, {}, []
    for h, fut in sorted(futs.items()):
        status, inv = fut.result()
        if status != 200 or not isinstance(inv, dict):
            errors.append(f"{h}: no answer ({inv.get('error') if isinstance(inv, dict) else inv})")
            continue
        hosts[h] = inv
        for e in inv.get("errors", []):
            errors.append(f"{h}: {e.get('vm_name') or e.get('dataset')}: {e.get('error')}")
        if (inv.get("host") or {}).get("ready") is False:
            errors.append(f"{h}: not ready: " + "; ".join(inv["host"].get("not_ready") or []))
        pending = (inv.get("host") or {}).get("demotion_pending")
        if isinstance(pending, dict) and pending:
            errors.append(f"{h}: demotion pending: " + ", ".join(
                f"{vm} (moved to {p})" for vm, p in sorted(pending.items())))
        for v in inv.get("vms", []):
            vms.setdefault(v["vm_name"], []).append((h, v))
    # protection: the manager's rule (vm_protection) on the inventories just fetched
    clean = {h: c for h, c in ((h, clean_inventory(inv)) for h, inv in hosts.items()) if c}
    prot = vm_protection(clean, Detector.eligible({m["hostname"]: m for m in members}),
                         cfg.max_replica_age)
    if args.json:
        print(json.dumps({"hosts": hosts, "errors": errors, "vms": [
            dict({"vm_name": name, "production": any(v["production"] for _, v in vms[name]),
                  "live_on": sorted(h for h, v in vms[name] if v["live"])},
                 **{k: prot.get(name, {}).get(k) for k in
                    ("protected", "protection", "replica_age_seconds")})
            for name in sorted(vms)]}, indent=2, sort_keys=True))
        return 0 if not errors else 1
    rows = [("VM", "PROD", "PARENT", "LIVE ON", "PROTECTED",
             "REPLICAS (host: newest snapshot)")]
    for name in sorted(vms):
        copies = vms[name]
        live = [h + (" (starting)" if v["state"] == "starting" else "")
                for h, v in copies if v["live"]]
        parents = sorted({v["parent_host"] or "-" for _, v in copies})
        reps = []
        for h, v in sorted(copies, key=lambda c: -((c[1]["latest_snapshot"] or {})
                                                    .get("creation") or 0)):
            snap = v["latest_snapshot"]
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["creation"])) \
                if snap else "no snapshot"
            reps.append(f"{h}: {when}")
        p = prot.get(name)
        rows.append((name, "yes" if any(v["production"] for _, v in copies) else "no",
                     ",".join(parents), ",".join(live) or "-",
                     "-" if p is None else "yes" if p["protected"] else f"NO ({p['protection']})",
                     "; ".join(reps)))
    print_table(rows)
    for e in errors:
        print(f"warning: {e}", file=sys.stderr)
    return 0 if not errors else 1


def parse_since(text, wall=None):
    """`events --since`: 90s, 30m, 1h, 2d (ago) or an ISO time (local time unless it
    names a zone) -> a wall-clock time in seconds.  ValueError if neither."""
    wall = time.time() if wall is None else wall
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if m:
        return wall - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    import datetime
    dt = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return dt.timestamp()   # a naive time is local time


def cmd_events(cfg, args):
    events = EventLog.read(Paths(cfg).events)
    if getattr(args, "since", None):
        try:
            since = parse_since(args.since)
        except ValueError:
            return die(f"--since {args.since!r}: expected e.g. 30m, 1h, 2d or an ISO time "
                       "(2026-01-31T14:00)", 2)
        events = [ev for ev in events if _is_number(ev.get("ts")) and ev["ts"] >= since]
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    for ev in events:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.get("ts", 0)))
        rest = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("ts", "node", "event"))
        print(f"{ts} {ev.get('node', '?')} {ev.get('event', '?')} {rest}".rstrip())
    return 0


def cmd_check_config(cfg, args):
    """The config, then the host checks `start` refuses on (exit 2 with one line each)."""
    checks = preflight(cfg)
    refuse, warn = refusals(cfg, checks)
    for line in warn:
        print(f"hoster_ha: warning (debug mode): {line}", file=sys.stderr)
    if refuse:
        for line in refuse:
            print(f"hoster_ha: {line}", file=sys.stderr)
        return 2
    role = "candidate" if cfg.is_candidate else "worker"
    print(f"{cfg.path}: OK ({cfg.hostname} is a {role}; candidates "
          f"{', '.join(cfg.candidate_names)}; failover_time {cfg.failover_time:g} s)")
    print(f"VM datasets: {', '.join(cfg.vm_datasets) or 'none'} ({cfg.vm_datasets_source})")
    for c in checks:
        print(c.line())
    return 0


def cmd_doctor(path, args):
    checks = doctor(path)
    ok = all(c.ok is not False for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        for c in checks:
            print(c.line())
        failed = sum(c.ok is False for c in checks)
        print("all checks passed" if ok else f"{failed} check{'s' * (failed > 1)} failed")
    return 0 if ok else 1


def build_parser():
    p = argparse.ArgumentParser(
        prog="hoster_ha.py",
        description="High availability for FreeBSD bhyve hosts managed by Hoster.",
        epilog="Config: --config, else $HOSTER_HA_CONFIG, else "
               + ", else ".join(DEFAULT_CONFIG_PATHS) + ".  Exit status: 0 success, "
               "1 runtime failure, 2 usage or configuration error.")
    p.add_argument("--version", action="version", version=f"hoster_ha {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, helptext, json_flag=False):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("--config", metavar="PATH", help="ha_config.json to use")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    sp = add("start", "start the agent (and its watchdog)")
    sp.add_argument("--ha-debug", action="store_true",
                    help="log every HA action as '(DEBUG) would ...' instead of doing it; "
                         "a fence exits with status 1")
    sp.add_argument("--foreground", action="store_true",
                    help="do not detach (for daemon(8) and rc.d)")
    add("stop", "leave the cluster (2 candidates must acknowledge), stop the agent and stand "
        "its watchdog down")
    add("status", ("show whether the agent and watchdog run, the node's cluster state, "
                   "whether it is ready (Hoster initialised, datasets available) and "
                   "pending demotions"),
        json_flag=True)
    add("members", "show the membership table of a candidate", json_flag=True)
    add("vms", "show every VM of the cluster: where it runs, replicas, newest snapshots",
        json_flag=True)
    ev = add("events", "print state_dir/events.jsonl", json_flag=True)
    ev.add_argument("--since", metavar="WHEN",
                    help="only events since WHEN: 30m, 1h, 2d ago, or an ISO time")
    sp = add("maintenance", "maintenance on: disarm this node (once 2 candidates know) so it is "
             "never failed over; off: arm again")
    sp.add_argument("state", choices=["on", "off"])
    add("terminate", "orderly stop of every member of the cluster (run on a candidate)")
    sp = add("check-config", "validate the config file and the host checks start refuses on "
             "(hostname, Hoster's HA, port, kernel watchdog) and exit")
    sp.add_argument("--ha-debug", action="store_true",
                    help="check as for start --ha-debug (only the port refuses)")
    add("doctor", "check this host, one line each with the fix: python, secret, config, "
        "hostname, Hoster initialised, datasets, port, Hoster's HA, syslog, kernel watchdog, "
        "clocks", json_flag=True)
    sub.add_parser("gen-secret", help="print a new random cluster secret",
                   description="print a new random cluster secret")
    return p


COMMANDS = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status,
            "members": cmd_members, "vms": cmd_vms, "events": cmd_events,
            "maintenance": cmd_maintenance, "terminate": cmd_terminate, "check-config": cmd_check_config}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "gen-secret":
        print(secrets.token_hex(32))
        return 0
    path = find_config_path(args.config)
    if args.command == "doctor":  # runs (and says so) whatever the config's problems
        return cmd_doctor(path, args)
    try:
        cfg = load_config(path, debug=getattr(args, "ha_debug", False))
    except ConfigError as e:
        return die(str(e), 2)
    try:
        return COMMANDS[args.command](cfg, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
