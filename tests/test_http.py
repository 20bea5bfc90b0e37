"""HTTP API hardening tests (SPEC §4.3) against one real agent on loopback.

One candidate (node1 of tools/localcluster.py, --ha-debug, FAST timings) runs for the
whole module; the two other candidates are absent.  Valid requests are built with
hoster_ha.sign / signed_headers; broken ones with raw http.client or raw sockets, every
one with a socket timeout so that no test can hang.

Checked after every test: the agent is still alive and answers; and no request in this
module ever got a 5xx.
"""

import http.client
import json
import math
import re
import secrets
import socket
import time

import pytest

import hoster_ha
from localcluster import LocalCluster


API = "/api/v1/ha/"
TIMEOUT = 5.0
STATUSES = []  # every status this module received: (what, status)


# -- the agent -----------------------------------------------------------------------------

class Agent:
    def __init__(self, cluster):
        self.cluster = cluster
        self.node = cluster["node1"]
        self.host, self.port = self.node.address, cluster.port
        self.secret = cluster.secret


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("http")))
    a = Agent(cluster)
    try:
        a.node.start()
        up = cluster.wait_for(lambda: _quiet_status(a) == 200, 15, interval=0.05)
        assert up, f"agent did not answer within 15 s: {a.node.log()[-2000:]}"
        # it registers with itself: wait until its own record is in its table
        assert cluster.wait_for(lambda: "node1" in members(a), 10, interval=0.05)
        yield a
    finally:
        # nothing started for this module may survive it (the watchdog included)
        gone, left = cluster.teardown()
        assert gone and not left, f"processes survived stop_all(): {left}"


@pytest.fixture(autouse=True)
def still_alive(agent):
    """After every test: the agent process runs and answers a signed request."""
    yield
    assert agent.node.proc.poll() is None, f"agent died: {agent.node.log()[-3000:]}"
    status, body = signed(agent, "GET", API + "status")
    assert status == 200 and body["hostname"] == "node1", (status, body)


def _quiet_status(a):
    try:
        return request(a, "GET", API + "status", headers=hoster_ha.signed_headers(
            a.secret, "GET", API + "status", b""), record=False)[0]
    except (OSError, http.client.HTTPException):
        return None


# -- request helpers -----------------------------------------------------------------------

def _record(what, status):
    STATUSES.append((what, status))
    assert status is None or status < 500, f"{what}: got {status}"


def request(a, method, target, body=b"", headers=None, record=True):
    """One request with http.client (adds Content-Length when a body is given)."""
    conn = http.client.HTTPConnection(a.host, a.port, timeout=TIMEOUT)
    try:
        conn.request(method, target, body=body if body or method == "POST" else None,
                     headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        status = resp.status
    finally:
        conn.close()
    if record:
        _record(f"{method} {target}", status)
    parsed = raw
    if ctype.startswith("application/json"):
        parsed = json.loads(raw.decode("utf-8"))
    return status, parsed


def signed(a, method, target, body=b"", secret=None, **kw):
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    headers = hoster_ha.signed_headers(secret or a.secret, method, target, body)
    return request(a, method, target, body, headers, **kw)


def auth_headers(a, method, target, body, ts=None, nonce=None, secret=None, sig=None):
    ts = int(time.time()) if ts is None else ts
    nonce = secrets.token_hex(16) if nonce is None else nonce
    if sig is None:
        sig = hoster_ha.sign(secret or a.secret, method, target, ts, nonce, body)
    return {"X-HA-Timestamp": str(ts), "X-HA-Nonce": nonce, "X-HA-Signature": sig}


def raw_exchange(a, data, timeout=TIMEOUT):
    """Send raw bytes; read until the server closes.  (status, headers dict, body, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection((a.host, a.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    elapsed = time.monotonic() - t0
    resp = b"".join(chunks)
    if not resp:
        _record(repr(data[:60]), None)
        return None, {}, b"", elapsed
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (ln.partition(":") for ln in lines[1:])}
    _record(repr(data[:60]), status)
    return status, headers, body, elapsed


def members(a):
    status, body = signed(a, "GET", API + "members", record=False)
    assert status == 200, (status, body)
    return {m["hostname"]: m for m in body["members"]}


def table(a):
    """The membership table without the fields that move by themselves: `silence`, and
    `ready`/`not_ready` (the node's own host check, every ping_interval, sets them; on a
    busy machine the first check can land between two reads)."""
    return {h: {k: v for k, v in m.items() if k not in ("silence", "ready", "not_ready")}
            for h, m in members(a).items()}


def metric(a, name):
    status, text = request(a, "GET", "/metrics")
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def register_body(hostname="intruder", startup_time=None, **over):
    body = {"hostname": hostname, "address": "127.0.0.9", "port": 4000, "protocol": "http",
            "startup_time": startup_time or int(time.time() * 1000), "backup_node": False,
            "failover_strategy": "change-parent", "failover_time": 13, "fenced_vms": []}
    body.update(over)
    return body


def ping_body(hostname, startup_time, **over):
    body = {"hostname": hostname, "startup_time": startup_time, "armed": False,
            "maintenance": False, "manager": False, "term": 0}
    body.update(over)
    return body


def assert_error(status, body, expected):
    assert status == expected, (status, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body


# -- authentication (401, and nothing changes) ---------------------------------------------

def test_unsigned_requests_get_401(agent):
    for method, name, body in (("GET", "members", b""), ("GET", "status", b""),
                               ("POST", "register", json.dumps(register_body()).encode()),
                               ("POST", "ping", json.dumps(ping_body("node1", 1)).encode())):
        status, answer = request(agent, method, API + name, body)
        assert_error(status, answer, 401)


def test_bad_signatures_get_401(agent):
    target = API + "members"
    good = auth_headers(agent, "GET", target, b"")
    flipped = dict(good, **{"X-HA-Signature": ("0" if good["X-HA-Signature"][0] != "0" else "1")
                            + good["X-HA-Signature"][1:]})
    cases = {
        "wrong secret": auth_headers(agent, "GET", target, b"", secret="another-secret-0123"),
        "one digit changed": flipped,
        "uppercase hex": auth_headers(agent, "GET", target, b"",
                                      sig=hoster_ha.sign(agent.secret, "GET", target,
                                                         int(time.time()), "ab" * 8,
                                                         b"").upper()),
        "signed for another target": auth_headers(agent, "GET", API + "status", b""),
        "signed for another method": auth_headers(agent, "POST", target, b""),
        "not hex": dict(good, **{"X-HA-Signature": "z" * 64}),
        "too short": dict(good, **{"X-HA-Signature": good["X-HA-Signature"][:63]}),
        "empty": dict(good, **{"X-HA-Signature": ""}),
        "missing timestamp": {k: v for k, v in good.items() if k != "X-HA-Timestamp"},
        "missing nonce": {k: v for k, v in good.items() if k != "X-HA-Nonce"},
    }
    for what, headers in cases.items():
        status, answer = request(agent, "GET", target, headers=headers)
        assert status == 401, (what, status, answer)
    # a body changed after signing
    body = json.dumps(register_body()).encode()
    headers = auth_headers(agent, "POST", API + "register", body)
    status, answer = request(agent, "POST", API + "register",
                             body.replace(b"intruder", b"intrudes"), headers)
    assert_error(status, answer, 401)
    # and the good one still works (its nonce was never used)
    assert request(agent, "GET", target, headers=good)[0] == 200


def test_timestamp_window(agent):
    target = API + "members"
    now = time.time()
    old = auth_headers(agent, "GET", target, b"", ts=int(now) - 61)           # >= 61 s old
    future = auth_headers(agent, "GET", target, b"", ts=math.ceil(now) + 61)  # >= 61 s ahead
    assert_error(*request(agent, "GET", target, headers=old), 401)
    assert_error(*request(agent, "GET", target, headers=future), 401)
    for bad_ts in ("12.5", "-5", "1e9", "", "0x10", "9" * 13, "\u00b9\u00b2"):
        headers = auth_headers(agent, "GET", target, b"")
        headers["X-HA-Timestamp"] = bad_ts
        status, answer = request(agent, "GET", target, headers=headers)
        assert status == 401, (bad_ts, status, answer)
    # inside the window either way: accepted
    for ts in (math.ceil(now) - 59, int(now) + 59):
        status, _ = request(agent, "GET", target,
                            headers=auth_headers(agent, "GET", target, b"", ts=ts))
        assert status == 200, ts


def test_replayed_nonce_gets_401(agent):
    target = API + "members"
    headers = auth_headers(agent, "GET", target, b"")
    assert request(agent, "GET", target, headers=headers)[0] == 200       # first use
    assert_error(*request(agent, "GET", target, headers=headers), 401)    # exact replay
    # the same nonce in a new, correctly signed request is a replay too
    again = auth_headers(agent, "GET", target, b"", nonce=headers["X-HA-Nonce"])
    assert_error(*request(agent, "GET", target, headers=again), 401)


def test_malformed_nonce_gets_401(agent):
    target = API + "members"
    for nonce in ("a" * 15, "a" * 65, "g" * 32, "", "0123456789abcdef-", "0x" + "a" * 30,
                  "abcdef0123456789 "):
        headers = auth_headers(agent, "GET", target, b"", nonce=nonce)  # signed over it
        status, answer = request(agent, "GET", target, headers=headers)
        assert status == 401, (nonce, status, answer)
    for nonce in ("a" * 16, "A" * 64):  # the bounds of 16 to 64 hex digits are accepted
        headers = auth_headers(agent, "GET", target, b"", nonce=nonce)
        status, _ = request(agent, "GET", target, headers=headers)
        assert status == 200, nonce


def _rejected_register_headers(agent, body):
    """(name, headers) pairs for a register body that must all be refused with 401."""
    target, now = API + "register", time.time()
    used = auth_headers(agent, "GET", API + "status", b"")
    assert request(agent, "GET", API + "status", headers=used)[0] == 200
    return [
        ("unsigned", {}),
        ("wrong secret", auth_headers(agent, "POST", target, body, secret="x" * 32)),
        ("tampered signature", dict(auth_headers(agent, "POST", target, body),
                                    **{"X-HA-Signature": "0" * 64})),
        ("61 s old", auth_headers(agent, "POST", target, body, ts=int(now) - 61)),
        ("61 s ahead", auth_headers(agent, "POST", target, body, ts=math.ceil(now) + 61)),
        ("malformed nonce", auth_headers(agent, "POST", target, body, nonce="xyz")),
        ("replayed nonce", auth_headers(agent, "POST", target, body, nonce=used["X-HA-Nonce"])),
    ]


def test_rejected_register_changes_nothing(agent):
    before_failures = metric(agent, "hoster_ha_auth_failures_total")
    old_self = members(agent)["node1"]
    bodies = [register_body("intruder"),
              # a new incarnation of node1 itself, at another address
              register_body("node1", startup_time=old_self["startup_time"] + 1,
                            address="10.6.6.6")]
    rejected = 0
    for body in bodies:
        raw = json.dumps(body).encode()
        for what, headers in _rejected_register_headers(agent, raw):
            before = table(agent)
            status, answer = request(agent, "POST", API + "register", raw, headers)
            assert_error(status, answer, 401)
            assert table(agent) == before, what
            rejected += 1
    assert "intruder" not in members(agent)
    assert members(agent)["node1"]["address"] == "127.0.0.1"
    assert metric(agent, "hoster_ha_auth_failures_total") >= before_failures + rejected


# -- size limits and framing ---------------------------------------------------------------

def test_content_length_over_64k_gets_413_without_reading_the_body(agent):
    cases = [
        (b"POST", API + "register", 65537, b""),
        (b"POST", API + "register", 10_000_000, b'{"hostname": "x"}'),
        (b"POST", API + "ping", 65537, b"{}"),
        (b"GET", API + "members", 65537, b""),
    ]
    for method, target, length, body in cases:
        data = (method + b" " + target.encode() + b" HTTP/1.1\r\nHost: node1\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + body)
        status, headers, answer, elapsed = raw_exchange(agent, data)
        assert status == 413, (method, target, length, status, answer)
        assert json.loads(answer.decode())["error"]
        # answered at once: the server did not wait for the (never sent) body
        assert elapsed < 2.0, elapsed


def test_body_of_exactly_64k_is_accepted(agent):
    body = register_body("padhost")
    body["pad"] = ""
    size = len(json.dumps(body).encode())
    body["pad"] = "x" * (65536 - size)
    raw = json.dumps(body).encode()
    assert len(raw) == 65536
    status, answer = signed(agent, "POST", API + "register", raw)
    assert status == 200 and answer.get("ok") is True, (status, answer)
    assert "padhost" in members(agent)


def test_post_without_content_length_gets_411(agent):
    for name in ("register", "ping"):
        target = API + name
        headers = auth_headers(agent, "POST", target, b"")
        data = (f"POST {target} HTTP/1.1\r\nHost: node1\r\n".encode()
                + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n")
        status, _, answer, elapsed = raw_exchange(agent, data)
        assert status == 411, (name, status, answer)
        assert json.loads(answer.decode())["error"]
        assert elapsed < 2.0


@pytest.mark.parametrize("length", ["abc", "-1", "+5", "5 5", "0x10"])
def test_malformed_content_length_gets_400(agent, length):
    target = API + "register"
    data = (f"POST {target} HTTP/1.1\r\nHost: node1\r\nContent-Length: {length}\r\n\r\n"
            ).encode("latin-1")
    status, _, answer, _ = raw_exchange(agent, data)
    assert status == 400, (length, status, answer)


@pytest.mark.parametrize("length", ["\u00b2", "\u00b9" * 3, "9" * 5000],
                         ids=["superscript-two", "superscript-ones", "5000-digits"])
def test_odd_content_length_gets_an_answer(agent, length):
    """A Content-Length that str.isdigit() accepts but int() refuses must still be answered
    (400, or 413 for a huge number), not drop the connection without a response."""
    target = API + "register"
    data = (f"POST {target} HTTP/1.1\r\nHost: node1\r\nContent-Length: {length}\r\n\r\n"
            ).encode("latin-1")
    status, _, answer, _ = raw_exchange(agent, data)
    assert status in (400, 413), (length[:20], status, answer)


# -- bodies: JSON and field types (400) ----------------------------------------------------

def test_malformed_json_gets_400(agent):
    for name in ("register", "ping"):
        for raw in (b'{"hostname": ', b"{not json}", b"\xff\xfe{}", b"[" * 60000, b"",
                    b'{"a": 1} trailing'):
            status, answer = signed(agent, "POST", API + name, raw)
            assert_error(status, answer, 400)


def test_json_that_is_not_an_object_gets_400(agent):
    for raw in (b"[]", b'[{"hostname": "x"}]', b'"register"', b"null", b"42", b"true"):
        for name in ("register", "ping"):
            status, answer = signed(agent, "POST", API + name, raw)
            assert_error(status, answer, 400)


REGISTER_MUTATIONS = {
    "port string x": {"port": "x"},
    "port numeric string": {"port": "4000"},
    "port float": {"port": 4000.0},
    "port bool": {"port": True},
    "port 0": {"port": 0},
    "port 70000": {"port": 70000},
    "startup_time string": {"startup_time": "1"},
    "startup_time float": {"startup_time": 1.5},
    "startup_time null": {"startup_time": None},
    "hostname shell": {"hostname": "bad host;rm -rf"},
    "hostname int": {"hostname": 5},
    "hostname empty": {"hostname": ""},
    "hostname too long": {"hostname": "a" * 300},
    "address int": {"address": 127},
    "protocol ftp": {"protocol": "ftp"},
    "backup_node string": {"backup_node": "no"},
    "failover_strategy unknown": {"failover_strategy": "teleport"},
    "failover_time string": {"failover_time": "60"},
    "failover_time bool": {"failover_time": True},
    "fenced_vms string": {"fenced_vms": "vm1"},
    "fenced_vms bad name": {"fenced_vms": ["bad vm;"]},
    "fenced_vms not strings": {"fenced_vms": [1]},
    "missing hostname": {"hostname": KeyError},
    "missing startup_time": {"startup_time": KeyError},
}


@pytest.mark.parametrize("what", sorted(REGISTER_MUTATIONS))
def test_register_with_wrong_fields_gets_400(agent, what):
    body = register_body("typecheck")
    for k, v in REGISTER_MUTATIONS[what].items():
        if v is KeyError:
            del body[k]
        else:
            body[k] = v
    before = table(agent)
    status, answer = signed(agent, "POST", API + "register", body)
    assert_error(status, answer, 400)
    assert table(agent) == before


PING_MUTATIONS = {
    "startup_time string": {"startup_time": "1"},
    "hostname shell": {"hostname": "bad host;rm -rf"},
    "armed string": {"armed": "yes"},
    "maintenance int": {"maintenance": 0},
    "manager int": {"manager": 1},
    "term string": {"term": "3"},
    "term bool": {"term": True},
    "term float": {"term": 1.0},
    "missing term": {"term": KeyError},
}


@pytest.mark.parametrize("what", sorted(PING_MUTATIONS))
def test_ping_with_wrong_fields_gets_400(agent, what):
    startup = members(agent)["node1"]["startup_time"]
    body = ping_body("node1", startup)
    for k, v in PING_MUTATIONS[what].items():
        if v is KeyError:
            del body[k]
        else:
            body[k] = v
    status, answer = signed(agent, "POST", API + "ping", body)
    assert_error(status, answer, 400)


GARBAGE = {
    # route: [(body, expected status or None for "anything below 500")]
    "plan": [({}, 400), ({"term": "1", "entries": []}, 400), ({"term": 0, "entries": "x"}, 400),
             ({"term": 0, "entries": [1]}, 400), ({"term": 0, "entries": [{}]}, 400),
             ({"term": 0, "entries": [{"vm": 1, "from": "a", "to": "b", "term": 0, "uid": "u",
                                       "state": "planned", "seq": 0}]}, 400)],
    "failover": [({}, 400), ({"vm_name": "../../etc", "from_host": "x", "term": 0,
                              "uid": "u1"}, 400),
                 ({"vm_name": "vm1", "from_host": "x", "term": "0", "uid": "u1"}, 400),
                 ({"vm_name": "vm1", "from_host": "x", "term": 0, "uid": 7}, 400),
                 # well-formed, but a debug node never starts a VM
                 ({"vm_name": "vm1", "from_host": "node2", "term": 0, "uid": "u2"}, 409)],
    "leave": [({}, 400), ({"hostname": 1, "startup_time": 1}, 400),
              ({"hostname": "ghost", "startup_time": "1"}, 400),
              ({"hostname": "ghost", "startup_time": 1}, None)],
    "maintenance": [({}, 400), ({"on": "yes"}, 400), ({"on": 1}, 400)],
}


def test_other_routes_reject_garbage_without_5xx(agent):
    """The later routes of §4.3 (plan, failover, leave, maintenance): wrong bodies get 400,
    never a 5xx, and the agent stays up.  (terminate is left out: it would stop the agent.)"""
    for route, cases in GARBAGE.items():
        for body, expected in cases:
            status, answer = signed(agent, "POST", API + route, body)
            if expected is None:
                assert status < 500, (route, body, status, answer)
            else:
                assert_error(status, answer, expected)
    status, answer = signed(agent, "GET", API + "vms")
    assert status == 200 and isinstance(answer.get("vms"), list), (status, answer)
    assert {"hostname", "free_memory", "running_vms"} <= set(answer["host"]), answer


# -- routing -------------------------------------------------------------------------------

def test_unknown_paths_get_404(agent):
    for target in (API + "nope", API, API + "members/extra", "/", "/api/v1/ha",
                   "/api/v2/ha/members", API + "..%2fmembers", API + "__init__"):
        status, answer = signed(agent, "GET", target)
        assert_error(status, answer, 404)
    status, answer = request(agent, "GET", API + "nope")  # unsigned: still 404 (or 401)
    assert status in (401, 404), (status, answer)


def test_other_methods_get_405(agent):
    for method in ("PUT", "DELETE", "PATCH"):
        for name in ("members", "register", "status"):
            target = API + name
            body = b"{}"
            status, answer = request(agent, method, target, body,
                                     auth_headers(agent, method, target, body))
            assert status == 405, (method, name, status, answer)
    # a known path with the other of GET/POST
    status, answer = signed(agent, "POST", API + "members", b"{}")
    assert_error(status, answer, 405)
    status, answer = signed(agent, "GET", API + "register")
    assert_error(status, answer, 405)


def test_metrics_unsigned_prometheus_text(agent):
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        ctype = resp.getheader("Content-Type", "")
    finally:
        conn.close()
    _record("GET /metrics", resp.status)
    assert resp.status == 200
    assert ctype.startswith("text/plain"), ctype
    assert text.endswith("\n")
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.]+(e[+-]?[0-9]+)?|NaN|"
                        r"[+-]Inf)$")
    helped, typed, samples = set(), {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            typed[name] = kind
        else:
            m = sample.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            samples[m.group(1)] = float(m.group(3))
    assert samples.get("hoster_ha_up") == 1
    for name in samples:
        assert name in helped and name in typed, name
    for name, kind in typed.items():
        if kind == "counter":
            assert name.endswith("_total"), name
    # only GET
    status, _ = request(agent, "POST", "/metrics", b"{}")
    assert status == 405


# -- protocol state ------------------------------------------------------------------------

def test_ping_from_unregistered_member_gets_409(agent):
    status, answer = signed(agent, "POST", API + "ping", ping_body("ghost", 12345))
    assert_error(status, answer, 409)
    assert "ghost" not in members(agent)
    # a registered member, but another incarnation (startup_time): 409 as well
    st = int(time.time() * 1000)
    status, answer = signed(agent, "POST", API + "register", register_body("pinger", st))
    assert status == 200 and answer["ok"] is True, (status, answer)
    status, answer = signed(agent, "POST", API + "ping", ping_body("pinger", st - 1))
    assert_error(status, answer, 409)
    # the right incarnation: 200 with the vote fields of §3.2 / §4.3
    status, answer = signed(agent, "POST", API + "ping", ping_body("pinger", st))
    assert status == 200, (status, answer)
    assert hoster_ha.check_fields(answer, hoster_ha.PING_ANSWER_FIELDS) is None, answer
    assert answer["vote_lease_ms"] == int(agent.cluster.timings["vote_lease"] * 1000)


def test_no_5xx_and_agent_alive_at_the_end(agent):
    """Runs last: nothing in this module got a 5xx, and the agent is still the same process."""
    assert STATUSES, "no requests recorded"
    five = [(w, s) for w, s in STATUSES if s is not None and s >= 500]
    assert not five, five
    assert agent.node.proc.poll() is None
    assert agent.node.pid() == agent.node.proc.pid
    status, answer = signed(agent, "GET", API + "status")
    assert status == 200 and answer["api_pid"] == agent.node.proc.pid
    assert "Traceback" not in agent.node.log()
