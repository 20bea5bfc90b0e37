"""The fake host's code (tools/fake_host_cmd.py is the command and documents every knob).

A module of its own so that Python caches its bytecode (see fake_host_cmd.py).
"""
import fcntl
import json
import math
import os
import signal
import sys
import time
import zlib

HERE = os.path.dirname(os.path.realpath(__file__))

DEFAULT_DATASET = "zroot/vm-encrypted"
FS_CREATION = 1700000000          # creation of the fake's filesystems (epoch seconds)
MAX_WAIT = 600.0                  # bound of every knob delay (s)
EXISTS_NOT = "cannot open '{}': dataset does not exist"


def read_text(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def is_production(cfg):
    return cfg.get("production") is True or cfg.get("live_status") in ("production", "prod")


def bounded(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(v) else min(max(v, 0.0), MAX_WAIT)


class Fail(Exception):
    """A command's failure: message (stderr for zfs), exit status."""

    def __init__(self, message, rc=1):
        super().__init__(message)
        self.rc = rc


class FakeHost:
    """One fake host: the folder NODE and what its commands do to it."""

    def __init__(self, node):
        self.node = os.path.abspath(node)
        self.vmm_dir = self.path("vmm")
        self.calls = self.path("calls.log")

    def path(self, *p):
        return os.path.join(self.node, *p)

    def record(self, line, t=None):
        """Append "<unix time> LINE" to calls.log (one write, O_APPEND)."""
        with open(self.calls, "a") as f:
            f.write(f"{time.time() if t is None else t:.6f} {line}\n")

    def lock(self):
        return HostLock(self.path("host.lock"))

    # -- identity and Hoster's init ---------------------------------------------------

    def hostname(self):
        name = read_text(self.path("hostname"))
        if name:
            return name
        try:
            with open(self.path("ha_config.json")) as f:
                name = json.load(f).get("hostname")
            if isinstance(name, str) and name:
                return name
        except (OSError, ValueError, AttributeError):
            pass
        return os.path.basename(self.node)

    def init_marker(self):
        """The init marker's path, or None when the host is always initialised.  A path
        outside NODE is refused: the fake never reads the real machine's marker."""
        p = read_text(self.path("hoster_init_path"))
        if not p:
            return None
        p = os.path.abspath(os.path.join(self.node, p))
        if not p.startswith(self.node + os.sep):
            raise Fail(f"fake hoster: init marker {p} is outside the fake host {self.node}",
                       64)
        return p

    # -- zfs state ----------------------------------------------------------------------

    def load_zfs(self):
        try:
            with open(self.path("zfs.json")) as f:
                st = json.load(f)
        except FileNotFoundError:
            st = {"datasets": {DEFAULT_DATASET: {
                "mountpoint": self.path("vms"), "mounted": True, "encryption": "aes-256-gcm",
                "keystatus": "available", "keyformat": "passphrase",
                "keylocation": "file:///fake/zroot-vm-encrypted.key"}}}
        st.setdefault("datasets", {})
        st.setdefault("children", {})
        return st

    def save_zfs(self, st):
        tmp = self.path("zfs.json.tmp")
        with open(tmp, "w") as f:
            json.dump(st, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path("zfs.json"))

    def hidden(self, ds):
        return self.path("zfs-unmounted", ds.replace("/", "%"))

    @staticmethod
    def top_of(st, name):
        """(top, child) for a filesystem name (child None for a top dataset), or None."""
        if name in st["datasets"]:
            return name, None
        top, _, child = name.rpartition("/")
        if top in st["datasets"] and child:
            return top, child
        return None

    @staticmethod
    def top_mounted(d):
        return bool(d.get("mounted")) and str(d.get("mountpoint", "")).startswith("/") and \
            d.get("keystatus", "-") != "unavailable"

    def data_dir(self, st, name):
        """Where a dataset's files are now (its mountpoint when mounted)."""
        top, child = self.top_of(st, name)
        d = st["datasets"][top]
        if child is None:
            return d["mountpoint"] if self.top_mounted(d) else self.hidden(top)
        inside = os.path.join(d["mountpoint"], child) if self.top_mounted(d) else None
        if inside and os.path.isdir(inside):
            return inside
        return self.hidden(name)

    def children(self, st, top):
        """{child: mounted} of a top dataset."""
        out = {}
        d = st["datasets"][top]
        if self.top_mounted(d):
            try:
                for n in os.listdir(d["mountpoint"]):
                    if os.path.isdir(os.path.join(d["mountpoint"], n)):
                        out[n] = True
            except OSError:
                pass
        prefix = top.replace("/", "%") + "%"
        try:
            for n in os.listdir(self.path("zfs-unmounted")):
                if n.startswith(prefix) and "%" not in n[len(prefix):]:
                    out.setdefault(n[len(prefix):], False)
        except OSError:
            pass
        return out

    def snapshots(self):
        try:
            with open(self.path("snapshots.json")) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}

    def table(self, st):
        """Every dataset, in ZFS's natural order (a dataset, its snapshots by txg, then its
        children): [{name, type, depth-parent, props...}]."""
        snaps = self.snapshots()
        rows = []

        def fs_row(name, parent, props):
            rows.append(dict(props, name=name, type="filesystem", parent=parent))
            key = name if name in snaps else name.rsplit("/", 1)[-1]
            if parent is None:
                key = name
            for s in snaps.get(key, []):
                rows.append({"name": f"{name}@{s[0]}", "type": "snapshot", "parent": name,
                             "creation": int(s[1]), "guid": str(s[2]), "mountpoint": "-",
                             "mounted": "-", "encryption": props["encryption"],
                             "keystatus": "-", "keylocation": "none", "keyformat": "-",
                             "encryptionroot": props["encryptionroot"]})

        for top in sorted(st["datasets"]):
            d = st["datasets"][top]
            enc = d.get("encryption", "off")
            mp = str(d.get("mountpoint", "none"))
            props = {"mountpoint": mp, "mountpoint_source": "local",
                     "mounted": "yes" if self.top_mounted(d) else "no",
                     "encryption": enc,
                     "keystatus": d.get("keystatus", "available") if enc != "off" else "-",
                     "keylocation": d.get("keylocation", "prompt") if enc != "off" else "none",
                     "keyformat": d.get("keyformat", "passphrase") if enc != "off" else "none",
                     "encryptionroot": top if enc != "off" else "-",
                     "creation": FS_CREATION, "guid": str(zlib.crc32(top.encode()) + 10**9)}
            fs_row(top, None, props)
            for child, mounted in sorted(self.children(st, top).items()):
                name = f"{top}/{child}"
                own = st["children"].get(name, {}).get("mountpoint")
                cmp_, src = (own, "local") if own else (
                    os.path.join(mp, child) if mp.startswith("/") else mp,
                    f"inherited from {top}")
                fs_row(name, top, dict(props, mountpoint=cmp_, mountpoint_source=src,
                                       mounted="yes" if mounted else "no",
                                       keylocation="none",
                                       guid=str(zlib.crc32(name.encode()) + 10**9)))
        return rows

    # -- zfs mount state changes (caller holds the host lock) -------------------------

    def _move(self, src, dst):
        if os.path.isdir(dst) and not os.listdir(dst):
            os.rmdir(dst)               # an empty mountpoint directory: mount over it
        if os.path.exists(dst):
            raise Fail(f"fake zfs: {dst} is in the way")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src):
            os.rename(src, dst)
        else:
            os.makedirs(dst)

    def mount(self, st, name):
        found = self.top_of(st, name)
        if found is None:
            raise Fail(EXISTS_NOT.format(name))
        top, child = found
        d = st["datasets"][top]
        if d.get("encryption", "off") != "off" and d.get("keystatus") == "unavailable":
            raise Fail(f"cannot mount '{name}': encryption key not loaded")
        if child is None:
            if self.top_mounted(d):
                raise Fail(f"cannot mount '{name}': filesystem already mounted")
            mp = str(d.get("mountpoint", ""))
            if not mp.startswith("/"):
                raise Fail(f"cannot mount '{name}': {'legacy' if mp == 'legacy' else 'no'} "
                           "mountpoint set")
            self._move(self.hidden(top), mp)
            d["mounted"] = True
            return
        if st["children"].get(name, {}).get("mountpoint"):
            raise Fail(f"cannot mount '{name}': legacy mountpoint set")
        if not self.top_mounted(d):
            raise Fail(f"cannot mount '{name}': fake zfs: mount its parent '{top}' first")
        inside = os.path.join(d["mountpoint"], child)
        if os.path.isdir(inside):
            raise Fail(f"cannot mount '{name}': filesystem already mounted")
        self._move(self.hidden(name), inside)

    def unmount(self, st, name):
        found = self.top_of(st, name)
        if found is None:
            raise Fail(EXISTS_NOT.format(name))
        top, child = found
        d = st["datasets"][top]
        if child is None:
            if not self.top_mounted(d):
                raise Fail(f"cannot unmount '{name}': not currently mounted")
            for c, mounted in sorted(self.children(st, top).items()):
                if mounted:
                    self._move(os.path.join(d["mountpoint"], c), self.hidden(f"{top}/{c}"))
            self._move(d["mountpoint"], self.hidden(top))
            d["mounted"] = False
            return
        inside = os.path.join(d["mountpoint"], child) if self.top_mounted(d) else None
        if inside is None or not os.path.isdir(inside):
            raise Fail(f"cannot unmount '{name}': not currently mounted")
        self._move(inside, self.hidden(name))

    def mount_all(self, st, load_keys=False):
        errors = []
        for top in sorted(st["datasets"]):
            d = st["datasets"][top]
            if load_keys and d.get("encryption", "off") != "off":
                d["keystatus"] = "available"
            if not self.top_mounted(d) and str(d.get("mountpoint", "")).startswith("/") and \
                    d.get("keystatus", "-") != "unavailable":
                try:
                    self.mount(st, top)
                except Fail as e:
                    errors.append(str(e))
            if self.top_mounted(d):
                for c, mounted in sorted(self.children(st, top).items()):
                    if not mounted and not st["children"].get(f"{top}/{c}", {}).get(
                            "mountpoint"):
                        try:
                            self.mount(st, f"{top}/{c}")
                        except Fail as e:
                            errors.append(str(e))
        return errors

    def unmount_all(self, st):
        for top in sorted(st["datasets"]):
            if self.top_mounted(st["datasets"][top]):
                self.unmount(st, top)
            for c, mounted in self.children(st, top).items():
                if mounted:
                    self.unmount(st, f"{top}/{c}")

    def boot(self):
        """What a boot does to ZFS: nothing mounted, prompt keys unloaded, the rest
        loaded and everything mountable mounted (caller holds the host lock)."""
        st = self.load_zfs()
        self.unmount_all(st)
        for d in st["datasets"].values():
            if d.get("encryption", "off") != "off":
                d["keystatus"] = "unavailable" if d.get("keylocation") == "prompt" \
                    else "available"
        self.mount_all(st)
        self.save_zfs(st)

    def vm_dir(self, name, dataset=DEFAULT_DATASET):
        """Where VM `name` of `dataset` keeps its files now (for a test that adds a VM):
        its mountpoint when mounted, else the unmounted dataset's hidden folder."""
        with self.lock():
            st = self.load_zfs()
            if dataset not in st["datasets"]:
                raise Fail(EXISTS_NOT.format(dataset))
            top_dir = self.data_dir(st, dataset)
            if self.top_mounted(st["datasets"][dataset]):
                inside = os.path.join(top_dir, name)
                if os.path.isdir(inside) or not os.path.isdir(self.hidden(f"{dataset}/{name}")):
                    return inside
            return self.hidden(f"{dataset}/{name}")

    # -- Hoster's view ------------------------------------------------------------------

    def hoster_vms(self):
        """{name: (folder, vm_config dict)}: what Hoster lists (folders with a
        vm_config.json in the mountpoints of the active datasets)."""
        st = self.load_zfs()
        try:
            with open(self.path("host_config.json")) as f:
                active = json.load(f).get("active_datasets")
        except (OSError, ValueError, AttributeError):
            active = None
        if not isinstance(active, list):
            active = sorted(st["datasets"])
        out = {}
        for ds in active:
            d = st["datasets"].get(ds)
            if d is None or not self.top_mounted(d):
                continue
            try:
                names = sorted(os.listdir(d["mountpoint"]))
            except OSError:
                continue
            for n in names:
                p = os.path.join(d["mountpoint"], n, "vm_config.json")
                try:
                    with open(p) as f:
                        cfg = json.load(f)
                except (OSError, ValueError):
                    continue
                if isinstance(cfg, dict) and n not in out:
                    out[n] = (os.path.dirname(p), cfg)
        return out

    def running(self):
        try:
            return sorted(os.listdir(self.vmm_dir))
        except FileNotFoundError:
            return []

    def start_plan(self, name):
        """(appear_after, dies_after) for the next start of `name` (consumes a `times`)."""
        path = self.path("vm_start.json")
        try:
            with open(path) as f:
                knobs = json.load(f)
        except (FileNotFoundError, ValueError):
            return 0.0, None
        plan = dict(knobs.get("*") or {})
        plan.update(knobs.get(name) or {})
        for key in (name, "*"):
            entry = knobs.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("times"), int):
                entry["times"] -= 1
                if entry["times"] <= 0:
                    del knobs[key]
                with open(path + ".tmp", "w") as f:
                    json.dump(knobs, f)
                os.replace(path + ".tmp", path)
        dies = plan.get("dies_after")
        return bounded(plan.get("appear_after")), None if dies is None else bounded(dies)


class HostLock:
    """NODE/host.lock (flock): starts, destroys, zfs changes and power changes happen one
    at a time."""

    def __init__(self, path):
        self.p = path

    def __enter__(self):
        self.f = open(self.p, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


# -- zfs ---------------------------------------------------------------------------------

LIST_PROPS = ("name", "type", "creation", "guid", "mountpoint", "mounted", "encryption",
              "keystatus", "keylocation", "keyformat", "encryptionroot", "used", "avail",
              "available", "refer", "referenced", "canmount")
READONLY = ("type", "creation", "guid", "mounted", "keystatus", "encryptionroot", "used",
            "avail", "available", "refer", "referenced", "encryption", "keyformat")
TYPES = {"filesystem": "filesystem", "fs": "filesystem", "snapshot": "snapshot",
         "snap": "snapshot", "volume": "volume", "vol": "volume", "bookmark": "bookmark",
         "all": "all"}


def getopt(args, with_arg):
    """Options (list of (flag, value)) and operands, getopt(3)-style."""
    opts, i = [], 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        a = args[i]
        if a == "--":
            i += 1
            break
        j = 1
        while j < len(a):
            c = a[j]
            if c in with_arg:
                v = a[j + 1:] if j + 1 < len(a) else (args[i + 1] if i + 1 < len(args) else None)
                if v is None:
                    raise Fail(f"missing argument for '{c}' option", 2)
                if j + 1 >= len(a):
                    i += 1
                opts.append((c, v))
                break
            opts.append((c, None))
            j += 1
        i += 1
    return opts, args[i:]


def value_of(row, prop, parsable):
    if prop == "name":
        return row["name"]
    if prop == "type":
        return row["type"]
    if prop == "creation":
        return str(row["creation"]) if parsable else \
            time.strftime("%a %b %e %H:%M %Y", time.localtime(row["creation"]))
    if prop in ("used", "refer", "referenced"):
        return "98304" if parsable else "96K"
    if prop in ("avail", "available"):
        return "-" if row["type"] == "snapshot" else ("107374182400" if parsable else "100G")
    if prop == "canmount":
        return "-" if row["type"] == "snapshot" else "on"
    return str(row.get(prop, "-"))


def selected(rows, operands, types, depth):
    """Rows under the operands (every row without operands) to the given depth (None:
    unlimited), of the types; missing operands -> errors."""
    by_name = {r["name"]: r for r in rows}
    errors, out, seen = [], [], set()
    roots = operands or [r["name"] for r in rows if r["parent"] is None]
    for root in roots:
        if root not in by_name:
            errors.append(EXISTS_NOT.format(root))
            continue
        for r in rows:
            d = None
            n, k = r["name"], 0
            while n is not None:
                if n == root:
                    d = k
                    break
                n = by_name[n]["parent"] if n in by_name else None
                k += 1
            if d is None or (depth is not None and d > depth) or r["name"] in seen:
                continue
            if "all" not in types and r["type"] not in types:
                continue
            seen.add(r["name"])
            out.append(r)
    return out, errors


def columns(table, header, scripted):
    if scripted:
        return ["\t".join(row) for row in table]
    rows = [header] + table
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def zfs_list(h, args):
    opts, operands = getopt(args, "osStd")
    scripted = any(f == "H" for f, _ in opts)
    parsable = any(f == "p" for f, _ in opts)
    props = ["name", "used", "avail", "refer", "mountpoint"]
    types, depth, sort, recurse = None, None, [], False
    for f, v in opts:
        if f == "o":
            props = v.split(",")
        elif f == "t":
            types = set()
            for t in v.split(","):
                if t not in TYPES:
                    raise Fail(f"invalid type '{t}'", 2)
                types.add(TYPES[t])
        elif f == "d":
            if not v.isdigit():
                raise Fail(f"invalid depth '{v}'", 2)
            depth = int(v)
        elif f == "r":
            recurse = True
        elif f in "sS":
            sort.append((v, f == "S"))
        elif f not in "Hp":
            raise Fail(f"invalid option '{f}'", 2)
    for p in props + [p for p, _ in sort]:
        if p not in LIST_PROPS:
            raise Fail(f"bad property list: invalid property '{p}'", 2)
    if types is None:
        types = {"filesystem", "volume"}
    if depth is None and not recurse:
        depth = 1 if (operands and types == {"snapshot"}) else (0 if operands else None)
    with h.lock():
        rows = h.table(h.load_zfs())
    out, errors = selected(rows, operands, types, depth)
    for prop, desc in reversed(sort):
        num = prop in ("creation", "guid", "used", "avail", "available", "refer",
                       "referenced")
        out.sort(key=lambda r: int(value_of(r, prop, True)) if num and value_of(
            r, prop, True).isdigit() else value_of(r, prop, True), reverse=desc)
    lines = columns([[value_of(r, p, parsable) for p in props] for r in out],
                    [p.upper() for p in props], scripted)
    if out:
        print("\n".join(lines))
    elif not errors:
        print("no datasets available", file=sys.stderr)
    if errors:
        raise Fail("\n".join(errors))


def zfs_get(h, args):
    opts, operands = getopt(args, "odts")
    scripted = any(f == "H" for f, _ in opts)
    parsable = any(f == "p" for f, _ in opts)
    fields = ["name", "property", "value", "source"]
    types, depth, recurse = {"all"}, 0, False
    for f, v in opts:
        if f == "o":
            fields = v.split(",")
        elif f == "t":
            types = {TYPES.get(t, t) for t in v.split(",")}
        elif f == "d":
            depth = int(v) if v.isdigit() else 0
        elif f == "r":
            recurse = True
    if recurse:
        depth = None
    if not operands:
        raise Fail("missing property argument", 2)
    props = operands[0].split(",")
    props = [p for p in LIST_PROPS if p != "name"] if props == ["all"] else props
    for p in props:
        if p not in LIST_PROPS:
            raise Fail(f"bad property list: invalid property '{p}'", 2)
    for f in fields:
        if f not in ("name", "property", "value", "source", "received"):
            raise Fail(f"invalid field '{f}'", 2)
    with h.lock():
        rows = h.table(h.load_zfs())
    out, errors = selected(rows, operands[1:], types, depth)
    table = []
    for r in out:
        for p in props:
            src = "-" if p in READONLY or r["type"] == "snapshot" else (
                r.get("mountpoint_source", "default") if p == "mountpoint" else "local")
            vals = {"name": r["name"], "property": p, "value": value_of(r, p, parsable),
                    "source": src, "received": "-"}
            table.append([vals[f] for f in fields])
    lines = columns(table, [f.upper() for f in fields], scripted)
    if table:
        print("\n".join(lines))
    if errors:
        raise Fail("\n".join(errors))


def zfs_change(h, sub, args):
    """mount, unmount/umount, load-key, unload-key, set, create."""
    opts, operands = getopt(args, "oL" if sub != "create" else "o")
    flags = {f for f, _ in opts}
    with h.lock():
        st = h.load_zfs()
        errors = []
        try:
            if sub == "mount" and not operands and "a" not in flags:
                for r in h.table(st):
                    if r["type"] == "filesystem" and r["mounted"] == "yes":
                        print(f"{r['name']}  {r['mountpoint']}")
            elif sub == "mount" and "a" in flags:
                errors = h.mount_all(st, load_keys="l" in flags)
            elif sub == "mount":
                for n in operands:
                    top = (h.top_of(st, n) or (n, None))[0]
                    if "l" in flags and top in st["datasets"] and \
                            st["datasets"][top].get("encryption", "off") != "off":
                        st["datasets"][top]["keystatus"] = "available"
                    h.mount(st, n)
            elif sub in ("unmount", "umount"):
                if "a" in flags:
                    h.unmount_all(st)
                for n in operands:
                    h.unmount(st, n)
            elif sub in ("load-key", "unload-key"):
                names = sorted(st["datasets"]) if "a" in flags else operands
                for n in names:
                    d = st["datasets"].get(n)
                    if d is None:
                        if h.top_of(st, n) is None:
                            raise Fail(EXISTS_NOT.format(n))
                        raise Fail(f"Keys must be {'loaded' if sub == 'load-key' else 'unloaded'}"
                                   f" for encryption root of '{n}' "
                                   f"({h.top_of(st, n)[0]}).")
                    if d.get("encryption", "off") == "off":
                        if "a" in flags:
                            continue
                        raise Fail(f"Key {sub.split('-')[0]} error: Keys can only be "
                                   f"{'loaded' if sub == 'load-key' else 'unloaded'} for "
                                   "encrypted datasets.")
                    if sub == "load-key":
                        if d.get("keystatus") == "available":
                            raise Fail(f"Key load error: Key already loaded for '{n}'.")
                        d["keystatus"] = "available"
                    else:
                        busy = h.top_mounted(d) or any(h.children(st, n).values())
                        if busy:
                            raise Fail(f"Key unload error: '{n}' is busy.")
                        if d.get("keystatus") == "unavailable":
                            raise Fail(f"Key unload error: Key already unloaded for '{n}'.")
                        d["keystatus"] = "unavailable"
            elif sub == "set":
                if len(operands) < 2 or "=" not in operands[0]:
                    raise Fail("missing property=value argument(s)", 2)
                prop, value = operands[0].split("=", 1)
                for n in operands[1:]:
                    set_prop(h, st, n, prop, value)
            elif sub == "inherit":
                if len(operands) < 2 or operands[0] != "mountpoint":
                    raise Fail("fake zfs: only `zfs inherit mountpoint DS/VM` is modelled", 2)
                for n in operands[1:]:
                    if h.top_of(st, n) is None:
                        raise Fail(EXISTS_NOT.format(n))
                    st["children"].pop(n, None)
            elif sub == "create":
                create(h, st, operands, dict(v.split("=", 1) for f, v in opts
                                             if f == "o" and "=" in v))
        except Fail:
            h.save_zfs(st)
            raise
        h.save_zfs(st)
    if errors:
        raise Fail("\n".join(errors))


def check_path(h, value):
    if not os.path.abspath(value).startswith(h.node + os.sep):
        raise Fail(f"fake zfs: mountpoint {value} is outside the fake host {h.node}")


def set_prop(h, st, name, prop, value):
    found = h.top_of(st, name)
    if found is None:
        raise Fail(EXISTS_NOT.format(name))
    top, child = found
    if prop == "mountpoint":
        if value not in ("legacy", "none"):
            if child is not None:
                raise Fail("fake zfs: a VM dataset's mountpoint can only be set to legacy or "
                           "none (or inherited)")
            check_path(h, value)
        if child is None:
            d = st["datasets"][top]
            was = h.top_mounted(d)
            if was:
                h.unmount(st, top)
            d["mountpoint"] = os.path.abspath(value) if value.startswith("/") else value
            if was and value.startswith("/"):
                h.mount(st, top)
        else:
            d = st["datasets"][top]
            if h.top_mounted(d) and os.path.isdir(os.path.join(d["mountpoint"], child)):
                h.unmount(st, name)
            st["children"].setdefault(name, {})["mountpoint"] = value
    elif prop == "keylocation":
        if child is not None or st["datasets"][top].get("encryption", "off") == "off":
            raise Fail(f"cannot set property for '{name}': 'keylocation' can only be set "
                       "on encryption roots")
        st["datasets"][top]["keylocation"] = value
    else:
        raise Fail(f"cannot set property for '{name}': fake zfs sets only mountpoint and "
                   "keylocation", 2)


def create(h, st, operands, props):
    if len(operands) != 1:
        raise Fail("missing filesystem argument", 2)
    name = operands[0]
    if h.top_of(st, name) is not None:
        raise Fail(f"cannot create '{name}': dataset already exists")
    top, _, child = name.rpartition("/")
    if top in st["datasets"]:
        d = st["datasets"][top]
        if d.get("keystatus") == "unavailable":
            raise Fail(f"cannot create '{name}': encryption key not loaded")
        if h.top_mounted(d):
            os.makedirs(os.path.join(d["mountpoint"], child))
        else:
            os.makedirs(h.hidden(name))
        return
    mp = props.get("mountpoint", h.path("mnt", *name.split("/")))
    if mp.startswith("/"):
        check_path(h, mp)
        mp = os.path.abspath(mp)
    enc = props.get("encryption", "off")
    d = {"mountpoint": mp, "mounted": False, "encryption": "off" if enc == "off" else
         "aes-256-gcm"}
    if enc != "off":
        d.update(keystatus="available", keyformat=props.get("keyformat", "passphrase"),
                 keylocation=props.get("keylocation", "prompt"))
    st["datasets"][name] = d
    os.makedirs(h.hidden(name))
    if mp.startswith("/"):
        h.mount(st, name)


def run_zfs(h, args):
    sub, rest = (args[0], args[1:]) if args else ("", [])
    if sub == "list":
        zfs_list(h, rest)
    elif sub == "get":
        zfs_get(h, rest)
    elif sub in ("mount", "unmount", "umount", "load-key", "unload-key", "set", "create",
                 "inherit"):
        zfs_change(h, sub, rest)
    else:
        raise Fail(f"fake zfs: unsupported arguments {args}", 64)


# -- hoster ------------------------------------------------------------------------------

ANSI = {"error": "\033[38;5;203m", "changed": "\033[0;93m", "info": "\033[0;92m"}
LEVELS = {"error": " 🚫 ERROR:   ", "changed": " 🔶 CHANGED: ", "info": " 🟢 INFO:    ",
          "warning": " 🔴 WARNING: "}


def emojlog(h, level, message):
    """Print a message as Hoster's emojlog does (stdout)."""
    line = f"{LEVELS[level]}🕔 {time.strftime('%Y-%m-%d %H:%M:%S')}: 📄 {message}"
    if os.path.exists(h.path("hoster_ansi")):
        line = f"{ANSI.get(level, '')}{line}\033[0m"
    print(line, flush=True)


def install(bin_dir, names):
    """Install the fake commands `names` in bin_dir (NODE/bin): each is a tiny script that
    runs this module with the interpreter of the caller, without site (-S).  Through
    `#!/usr/bin/env python3` every call paid for a version manager's shim and for the
    site packages' .pth files (certifi here): ~145 ms of CPU instead of ~15 ms, which on a
    busy 2-core machine was enough to push a fence's inventory and destroys past a test's
    short fence_timeout.  A path the kernel cannot use in a #! line falls back to env."""
    exe = sys.executable
    line = (f"#!{exe} -S" if exe and " " not in exe and len(exe) < 120
            else "#!/usr/bin/env python3")
    text = (f"{line}\n# fake host command: {os.path.join(HERE, 'fake_host_cmd.py')}\n"
            "import sys\nsys.dont_write_bytecode = False\n"
            f"sys.path.insert(0, {HERE!r})\n"
            "from fake_host import main\nsys.exit(main(sys.argv))\n")
    for name in names:
        path = os.path.join(bin_dir, name)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)


def launch_supervisor(h, name, appear, dies, boot):
    # imported here: most calls never need it (each call is a new process)
    import subprocess

    sup = h.path("bin", "vm_supervisor_service")
    if not os.path.exists(sup):
        install(h.path("bin"), ["vm_supervisor_service"])
    env = dict(os.environ, FAKE_APPEAR_AFTER=repr(appear),
               FAKE_DIES_AFTER="" if dies is None else repr(dies), FAKE_BOOT=boot)
    p = subprocess.Popen([sys.executable, "-S", sup, "for", name], env=env, cwd=h.node,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    os.makedirs(h.path("supervisors"), exist_ok=True)
    open(h.path("supervisors", f"{name}.{p.pid}"), "w").close()


def host_gone(h, boot):
    return os.path.exists(h.path("down")) or read_text(h.path("boot"), "0") != boot


def start_one(h, name, boot, vms=None):
    """One VM start as `hoster vm start NAME` does it; raises Fail(message)."""
    why = None
    if vms is None:
        vms = h.hoster_vms()
    if name in h.running():
        why = "vm is already running"
    elif name not in vms:
        why = "vm doesn't exist"
    elif vms[name][1].get("parent_host") != h.hostname():
        why = ("cannot start a backup VM on this system (change the parent host first or "
               "execute cireset)")
    if why:
        h.record(f"refused hoster vm start {name} ({why})")
        raise Fail(why)
    appear, dies = h.start_plan(name)
    if appear > 0:
        h.record(f"pending hoster vm start {name}")
        launch_supervisor(h, name, appear, dies, boot)
        return
    if host_gone(h, boot):
        h.record(f"refused hoster vm start {name} (host down or rebooted)")
        raise Fail(f"fake hoster: host {os.path.basename(h.node)} is down")
    os.makedirs(h.vmm_dir, exist_ok=True)
    h.record(f"hoster vm start {name}")
    open(os.path.join(h.vmm_dir, name), "w").close()
    if dies is not None:
        launch_supervisor(h, name, 0.0, dies, boot)


def run_hoster(h, args):
    if args[:1] == ["init"]:
        marker = h.init_marker()
        if marker:
            with open(marker, "w"):
                pass
            os.chmod(marker, 0o600)
            emojlog(h, "changed", f"State file {marker} has been created")
        emojlog(h, "info", "Please don't forget to mount any encrypted ZFS volumes")
        return
    if args[:1] != ["vm"] or len(args) < 2:
        raise Fail(f"fake hoster: unsupported arguments {args}", 64)
    marker = h.init_marker()
    sub = args[1]
    if marker and not os.path.exists(marker):
        if sub == "start" and len(args) == 3:
            h.record(f"refused hoster vm start {args[2]} (hoster init not run)")
        raise Fail("Please, execute `hoster init` to start using this utility")
    if sub == "start" and len(args) == 3:
        boot = read_text(h.path("boot"), "0")
        delay = read_text(h.path("start_delay"))
        if delay:
            h.record(f"pending hoster vm start {args[2]}")
            time.sleep(bounded(delay))
        with h.lock():
            start_one(h, args[2], boot)
    elif sub == "start-all":
        short, prod_only, wait, rest = [], False, 0.0, list(args[2:])
        while rest:
            a = rest.pop(0)
            if a == "--production-only":
                prod_only = True
            elif a.startswith("--wait-time"):
                wait = bounded(a.split("=", 1)[1] if "=" in a else (rest.pop(0) if rest else 0))
            else:
                short.append(a)
        opts, _ = getopt(short, "t")
        prod_only = prod_only or any(f == "p" for f, _ in opts)
        wait = next((bounded(v) for f, v in opts if f == "t"), wait)
        boot = read_text(h.path("boot"), "0")
        started = 0
        vms = h.hoster_vms()
        for name in sorted(vms, key=str.lower):
            cfg = vms[name][1]
            if name in h.running() or (prod_only and cfg.get("production") is not True) or \
                    cfg.get("parent_host") != h.hostname():
                continue
            if started and wait:
                time.sleep(wait)
            started += 1
            with h.lock():
                try:
                    start_one(h, name, boot)
                except Fail:
                    pass  # Hoster logs it to its audit log and goes on
    elif sub == "cireset" and len(args) == 3:
        name = args[2]
        with h.lock():
            vms = h.hoster_vms()
            if name not in vms:
                raise Fail("sorry, could not find this VM")
            if name in h.running():
                raise Fail("vm has to be stopped")
            path = os.path.join(vms[name][0], "vm_config.json")
            cfg = dict(vms[name][1], parent_host=h.hostname())
            if cfg.get("failover_strategy") not in ("cireset", "change_parent"):
                cfg["failover_strategy"] = "change_parent"   # Hoster's read default
            with open(path + ".tmp", "w") as f:
                json.dump(cfg, f, indent=2)
            os.replace(path + ".tmp", path)
    elif sub == "stop" and len(args) >= 3:
        long_ = {"--force": "f", "--cleanup": "c"}
        opts, operands = getopt([a for a in args[2:] if a not in long_], "")
        flags = {f for f, _ in opts} | {long_[a] for a in args[2:] if a in long_}
        name = operands[0] if operands else ""
        with h.lock():
            if name not in h.hoster_vms():
                raise Fail(f"VM doesn't exist: {name}")
            if name not in h.running():
                raise Fail(f"VM is already offline: {name}")
            if "c" in flags and "f" not in flags:
                raise Fail("cleanup parameter can only be used together with force kill "
                           "parameter")
            if "c" in flags:
                kill_supervisor(h, name)
            try:
                os.unlink(os.path.join(h.vmm_dir, name))
                h.record(f"vm gone {name}")
            except FileNotFoundError:
                pass
    else:
        raise Fail(f"fake hoster: unsupported arguments {args}", 64)


def supervisors(h):
    """{pid: VM name} of the fake supervisors that still run (NODE/supervisors/NAME.PID;
    a pid counts only while its command line is that supervisor's)."""
    out = {}
    try:
        files = os.listdir(h.path("supervisors"))
    except FileNotFoundError:
        return out
    sup = os.fsencode(h.path("bin", "vm_supervisor_service"))
    for fn in files:
        name, _, pid = fn.rpartition(".")
        try:
            with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (ValueError, OSError):
            continue
        if sup in argv and argv[-2:] in ([os.fsencode(name), b""], [os.fsencode(name)]):
            out[int(pid)] = name
    return out


def kill_supervisor(h, name=None):
    """SIGKILL the fake supervisors of VM `name` (of every VM: None)."""
    for pid, vm in supervisors(h).items():
        if name is None or vm == name:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def run_supervisor(h, name):
    """The fake vm_supervisor_service: the VM appears after FAKE_APPEAR_AFTER s and, if
    FAKE_DIES_AFTER is set, vanishes that long after it appeared."""
    appear = bounded(os.environ.get("FAKE_APPEAR_AFTER"))
    dies = os.environ.get("FAKE_DIES_AFTER", "")
    boot = os.environ.get("FAKE_BOOT", "0")
    entry = os.path.join(h.vmm_dir, name)
    try:
        if appear > 0:
            time.sleep(appear)
            with h.lock():
                if host_gone(h, boot):
                    h.record(f"refused hoster vm start {name} (host down or rebooted)")
                    return
                if os.path.exists(entry):   # bhyve: vm_create: File exists
                    h.record(f"refused hoster vm start {name} (the VM exists already)")
                    return
                os.makedirs(h.vmm_dir, exist_ok=True)
                h.record(f"hoster vm start {name}")
                open(entry, "w").close()
        if dies:
            end = time.monotonic() + bounded(dies)
            while time.monotonic() < end:   # bounded: dies <= MAX_WAIT
                if not os.path.exists(entry):
                    return                  # destroyed meanwhile
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
            with h.lock():
                if host_gone(h, boot):
                    return
                try:
                    os.unlink(entry)
                except FileNotFoundError:
                    return
                h.record(f"vm gone {name}")
    finally:
        try:
            os.unlink(h.path("supervisors", f"{name}.{os.getpid()}"))
        except OSError:
            pass


def run_pkill(h, args):
    """`pkill [-SIGNAL] -f PATTERN`, limited to this fake host's supervisors (the real one
    would match every process of the machine): each whose command line (argv joined by
    spaces) PATTERN matches (a regular expression, searched) gets the signal.  Exit 0 if
    one matched, 1 if none, 2 for arguments the fake does not know."""
    import re

    if os.path.exists(h.path("pkill_fails")):
        raise Fail("pkill: cannot read process table", 3)
    sig, full, rest = signal.SIGTERM, False, list(args)
    while rest and rest[0].startswith("-") and len(rest) > 1:
        a = rest.pop(0)
        if a == "-f":
            full = True
        elif a[1:].isdigit():
            sig = int(a[1:])
        elif hasattr(signal, "SIG" + a[1:].upper().removeprefix("SIG")):
            sig = getattr(signal, "SIG" + a[1:].upper().removeprefix("SIG"))
        else:
            raise Fail(f"pkill: illegal option -- {a[1:]}", 2)
    if not full or len(rest) != 1:
        raise Fail("fake pkill: only `pkill [-SIGNAL] -f PATTERN` is supported", 2)
    try:
        pattern = re.compile(rest[0])
    except re.error as e:
        raise Fail(f"pkill: Cannot compile regular expression `{rest[0]}' ({e})", 2)
    hit = False
    for pid in supervisors(h):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                line = " ".join(a.decode("utf-8", "replace")
                                for a in f.read().split(b"\0") if a)
        except OSError:
            continue
        if pattern.search(line):
            try:
                os.kill(pid, sig)
                hit = True
            except OSError:
                pass
    return 0 if hit else 1


# -- power -------------------------------------------------------------------------------

def ours(h, pid):
    """True if pid is this node's agent or watchdog (its command line names a file of
    this node, the config).  Where /proc is missing, trust the pid file."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")
    except OSError:
        return False
    return any(a.startswith(h.node + os.sep) for a in argv) and \
        any(a.endswith(("hoster_ha.py", "ha_watchdog.py")) for a in argv)


def take_down(h, reason):
    """Everything a real reboot (or power loss) ends: the node's agent and watchdog, the
    fake supervisors and the running VMs.  The caller (a child of one of them) exits
    right after."""
    with h.lock():
        for which in ("hoster_ha.pid", "ha_watchdog.pid"):
            try:
                pid = int(read_text(h.path("run", which), "0"))
            except ValueError:
                continue
            if pid > 1 and pid != os.getpid() and ours(h, pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        kill_supervisor(h)
        for name in h.running():
            try:
                os.unlink(os.path.join(h.vmm_dir, name))
            except FileNotFoundError:
                continue
            h.record(f"vm gone {name}")
        t = time.time()
        with open(h.path("down"), "w") as f:
            f.write(f"{t:.6f} {reason}\n")
        h.record(f"down {reason}", t)


def power_on(h):
    with h.lock():
        try:
            boot = int(read_text(h.path("boot"), "0")) + 1
        except ValueError:
            boot = 1
        with open(h.path("boot"), "w") as f:
            f.write(f"{boot}\n")
        marker = h.init_marker()
        if marker:
            try:
                os.unlink(marker)
            except FileNotFoundError:
                pass
        if os.path.exists(h.path("zfs.json")):
            h.boot()
        try:
            os.unlink(h.path("down"))
        except FileNotFoundError:
            pass
        h.record("up power on")


SYSCTLS = {"hw.pagesize": lambda h: "4096", "kern.hostname": lambda h: h.hostname()}


def main(argv):
    h = FakeHost(os.path.dirname(os.path.dirname(os.path.abspath(argv[0]))))
    cmd = os.path.basename(argv[0])
    args = argv[1:]
    precise = ((cmd == "hoster" and args[:2] == ["vm", "start"] and len(args) == 3) or
               (cmd == "bhyvectl" and len(args) == 2 and args[0] == "--destroy"
                and args[1].startswith("--vm=")) or cmd in ("power", "vm_supervisor_service"))
    if not precise:
        h.record(f"{cmd} {' '.join(args)}")
    try:
        if cmd == "zfs":
            run_zfs(h, args)
        elif cmd == "hoster":
            try:
                run_hoster(h, args)
            except Fail as e:
                if e.rc == 64:
                    raise
                emojlog(h, "error", str(e))
                return 1
        elif cmd == "vm_supervisor_service" and len(args) == 2 and args[0] == "for":
            run_supervisor(h, args[1])
        elif cmd == "bhyvectl" and precise:
            delay = read_text(h.path("destroy_delay"))
            if delay:
                time.sleep(bounded(delay))
            name = args[1][5:]
            with h.lock():
                try:
                    os.unlink(os.path.join(h.vmm_dir, name))
                    ok = True
                except FileNotFoundError:
                    ok = False
                h.record(f"{cmd} {' '.join(args)}")
            if not ok:
                raise Fail(f"vm_open: {name} could not be opened: No such file or directory")
        elif cmd in ("shutdown", "reboot"):
            # recorded in calls.log above; the real machine is never touched
            if os.path.exists(h.path("reboot_takes_host_down")):
                take_down(h, f"{cmd} {' '.join(args)}")
        elif cmd == "power" and args[:1] == ["off"]:
            take_down(h, " ".join(["power"] + args))
        elif cmd == "power" and args == ["on"]:
            power_on(h)
        elif cmd == "pkill":
            return run_pkill(h, args)
        elif cmd == "hostname" and not args:
            print(h.hostname())
        elif cmd == "sysctl":
            oids = [a for a in args if not a.startswith("-")]
            quiet = any(a.startswith("-") and "q" in a for a in args)
            if oids == ["vm.stats.vm.v_free_count", "hw.pagesize"] or not oids:
                pages = read_text(h.path("free_pages"))
                print(int(pages) if pages.isdigit() else 262144)
                print(4096)
                return 0
            rc = 0
            for oid in oids:
                if oid == "vm.stats.vm.v_free_count":
                    pages = read_text(h.path("free_pages"))
                    print(int(pages) if pages.isdigit() else 262144)
                elif oid in SYSCTLS:
                    print(SYSCTLS[oid](h))
                else:
                    rc = 1
                    if not quiet:
                        print(f"sysctl: unknown oid '{oid}'", file=sys.stderr)
            return rc
        else:
            raise Fail(f"fake {cmd}: unsupported arguments {args}", 64)
    except Fail as e:
        print(str(e), file=sys.stderr)
        return e.rc
    return 0

