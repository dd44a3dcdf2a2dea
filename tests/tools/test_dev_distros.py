"""./dev on the distributions it promises (Debian 12, Ubuntu 22.04 and 24.04), run against each one's
package set: the real script, with dpkg-query, apt-cache, apt-get, g++, meson and id replaced by a
fake distribution (this file, called as those commands) that answers from a JSON state: what is
installed, what the package lists offer once fetched, the compiler's and Meson's versions. It checks
what ./dev installs, which compiler and Boost it picks, what it tells the user, and that it configures
Meson only when the Meson is new enough.

usage: test_dev_distros.py SOURCE_ROOT      (as a fake command: FAKE_DISTRO=state.json NAME ARGS...)
"""

import fnmatch
import json
import os
import shlex
import subprocess
import sys
import tempfile

COMMON = ["g++", "ninja-build", "pkg-config", "cmake", "python3", "universal-ctags", "meson"]
OPTIONAL = ["libfmt-dev", "doctest-dev", "libgloo-dev", "nlohmann-json3-dev", "libcli11-dev", "libbenchmark-dev",
            "python3-dev", "pybind11-dev", "python3-numpy", "python3-pytest"]

# What each distribution's lists offer (the versions that matter: g++ and Meson; Boost by name).
DISTROS = {
    "debian12": {"gxx": "12", "meson": "1.0.1",
                 "offers": COMMON + OPTIONAL + ["g++-12", "libboost1.74-dev", "libboost1.81-dev"]},
    "ubuntu2204": {"gxx": "11", "meson": "0.61.2",
                   "offers": COMMON + [p for p in OPTIONAL if p != "libgloo-dev"] + ["g++-12", "libboost1.74-dev"]},
    "ubuntu2404": {"gxx": "13", "meson": "1.3.2",
                   "offers": COMMON + [p for p in OPTIONAL if p != "libgloo-dev"]
                   + ["g++-12", "g++-14", "libboost1.74-dev", "libboost1.83-dev"]},
}


# ---- the fake commands ---------------------------------------------------------------------------
def load():
    with open(os.environ["FAKE_DISTRO"]) as f:
        return json.load(f)


def save(state):
    with open(os.environ["FAKE_DISTRO"], "w") as f:
        json.dump(state, f)


def log(state, line):
    state["log"].append(line)
    save(state)


def offered(state):
    return DISTROS[state["distro"]]["offers"] if state["lists"] else []


def dpkg_query(state, args):
    fmt = next(a[3:] for a in args if a.startswith("-f="))  # ./dev writes -f='FORMAT'
    pattern = args[-1]
    names = [p for p in state["installed"] if fnmatch.fnmatch(p, pattern)]
    if not names:
        print(f"dpkg-query: no packages found matching {pattern}", file=sys.stderr)
        return 1
    for name in names:
        print("install ok installed" if "${Status}" in fmt else name, end="" if "${Status}" in fmt else "\n")
    return 0


def apt_cache(state, args):
    if args[0] == "pkgnames":
        print("\n".join(p for p in offered(state) if p.startswith(args[1])))
        return 0
    if args[0] == "show":
        return 0 if args[1] in offered(state) else 100
    if args[0] == "policy" and args[1] == "g++" and "g++" in offered(state):
        gxx = DISTROS[state["distro"]]["gxx"]
        print(f"g++:\n  Installed: (none)\n  Candidate: 4:{gxx}.2.0-1\n  Version table:")
    return 0


def apt_get(state, args):
    if args[0] == "update":
        if state.get("offline"):
            print("E: Failed to fetch http://archive.ubuntu.com/ubuntu/dists/noble/InRelease", file=sys.stderr)
            return 100
        state["lists"] = True
        log(state, "apt-get update")
        return 0
    wanted = [a for a in args[1:] if not a.startswith("-")]
    unknown = [p for p in wanted if p not in offered(state)]
    if unknown:
        print(f"E: Unable to locate package {unknown[0]}", file=sys.stderr)
        return 100
    state["installed"] = sorted(set(state["installed"]) | set(wanted))
    log(state, "apt-get install " + " ".join(sorted(wanted)))
    return 0


def gxx(state, args, name):
    version = DISTROS[state["distro"]]["gxx"] if name == "g++" else name.split("-")[1]
    if name not in state["installed"]:
        print(f"{name}: command not found", file=sys.stderr)
        return 127
    print(version if args == ["-dumpversion"] else f"{name} {version}")
    return 0


def meson(state, args):
    version = state.get("pip_meson") or ("meson" in state["installed"] and DISTROS[state["distro"]]["meson"])
    if not version:
        print("meson: command not found", file=sys.stderr)
        return 127
    if args == ["--version"]:
        print(version)
        return 0
    log(state, f"meson {args[0]} CXX={os.environ.get('CXX', '')}")
    return 0


def fake_command(name, args):
    state = load()
    if name == "dpkg-query":
        return dpkg_query(state, args)
    if name == "apt-cache":
        return apt_cache(state, args)
    if name == "apt-get":
        return apt_get(state, args)
    if name.startswith("g++"):
        return gxx(state, args, name)
    if name == "meson":
        return meson(state, args)
    if name == "id":
        print(state["uid"])
        return 0
    raise SystemExit(f"fake distribution: no command {name}")


# ---- the test ------------------------------------------------------------------------------------
class Machine:
    """A scratch directory with the fake commands first on PATH and one distribution's state."""

    def __init__(self, root, distro, installed=(), uid=0, lists=False, pip_meson=None, offline=False):
        self.root = root
        self.dir = tempfile.mkdtemp(prefix=f"dev-{distro}-")
        self.state_path = os.path.join(self.dir, "state.json")
        with open(self.state_path, "w") as f:
            json.dump({"distro": distro, "installed": list(installed), "uid": uid, "lists": lists,
                       "pip_meson": pip_meson, "offline": offline, "log": []}, f)
        bin_dir = os.path.join(self.dir, "bin")
        os.mkdir(bin_dir)
        me = os.path.abspath(__file__)
        for name in ["dpkg-query", "apt-cache", "apt-get", "g++", "g++-12", "g++-13", "g++-14", "meson", "id"]:
            path = os.path.join(bin_dir, name)
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(me)} --as {name} \"$@\"\n")
            os.chmod(path, 0o755)
        self.env = {"PATH": bin_dir + ":/usr/bin:/bin", "FAKE_DISTRO": self.state_path, "HOME": self.dir,
                    "EPLB_BUILD_DIR": os.path.join(self.dir, "build")}

    def dev(self, *args):
        out = subprocess.run([os.path.join(self.root, "dev"), *args], env=self.env, capture_output=True, text=True,
                             timeout=120)
        return out.returncode, out.stdout, out.stderr

    def state(self):
        with open(self.state_path) as f:
            return json.load(f)


def installs(machine):
    return [set(line.split()[2:]) for line in machine.state()["log"] if line.startswith("apt-get install")]


def expect(cond, what, out=""):
    if not cond:
        raise SystemExit(f"FAIL: {what}\n{out}")


def debian12_fresh_root(root):
    m = Machine(root, "debian12", installed=["python3"])
    rc, out, err = m.dev("build")
    expect(rc == 0, "debian12: ./dev build exits 0", err)
    want = set(COMMON + OPTIONAL + ["libboost1.81-dev"]) - {"python3"}
    expect(installs(m) == [want], f"debian12: installs {sorted(want)}, got {installs(m)}", err)
    expect(m.state()["log"][0] == "apt-get update", "debian12: fetches the package lists first", m.state()["log"])
    expect(m.state()["log"][-2:] == ["meson setup CXX=", "meson compile CXX="], "debian12: configures with g++",
           m.state()["log"])
    # Everything there now: a second run installs nothing.
    rc, out, err = m.dev("build")
    expect(rc == 0 and len(installs(m)) == 1, "debian12: the second run installs nothing", err)


def ubuntu2204_fresh_root(root):
    m = Machine(root, "ubuntu2204")
    rc, out, err = m.dev("build")
    expect(rc == 1, "ubuntu2204: ./dev build stops when only Meson 0.61 exists", err)
    want = set(COMMON + OPTIONAL + ["g++-12"]) - {"libgloo-dev"}
    expect(installs(m) == [want], f"ubuntu2204: installs {sorted(want)}, got {installs(m)}", err)
    expect("building with g++-12" in err, "ubuntu2204: says it builds with g++-12", err)
    expect("Meson uses the headers in subprojects/" in err, "ubuntu2204: says Boost comes from subprojects/", err)
    expect("pip3 install 'meson>=" in err and "this is 0.61.2" in err, "ubuntu2204: one line on how to get Meson",
           err)
    expect(not any(line.startswith("meson setup") for line in m.state()["log"]), "ubuntu2204: no setup with 0.61")
    # With a Meson from pip the same machine builds, with g++-12.
    state = m.state()
    state["pip_meson"] = "1.2.3"
    with open(m.state_path, "w") as f:
        json.dump(state, f)
    rc, out, err = m.dev("build")
    expect(rc == 0, "ubuntu2204 with pip's Meson: ./dev build exits 0", err)
    expect(m.state()["log"][-2:] == ["meson setup CXX=g++-12", "meson compile CXX=g++-12"],
           "ubuntu2204: configures with g++-12", m.state()["log"])
    rc, out, err = m.dev("packages")
    expect(rc == 0 and out.splitlines() == ["compiler: g++-12", "boost: subprojects/boost_headers", "meson: 1.2.3",
                                             "missing: "], "ubuntu2204: ./dev packages", out + err)


def ubuntu2404_fresh_root(root):
    m = Machine(root, "ubuntu2404")
    rc, out, err = m.dev("build")
    expect(rc == 0, "ubuntu2404: ./dev build exits 0", err)
    want = set(COMMON + OPTIONAL + ["libboost1.83-dev"]) - {"libgloo-dev"}
    expect(installs(m) == [want], f"ubuntu2404: installs {sorted(want)}, got {installs(m)}", err)
    expect("g++-" not in err, "ubuntu2404: the default g++ 13 is kept", err)
    expect(m.state()["log"][-2:] == ["meson setup CXX=", "meson compile CXX="], "ubuntu2404: configures",
           m.state()["log"])


def not_root_prints_the_line(root):
    m = Machine(root, "ubuntu2204", installed=["python3", "g++", "cmake"], uid=1000, lists=True)
    rc, out, err = m.dev("build")
    expect(rc == 1, "not root: ./dev build exits 1", err)
    line = [x for x in err.splitlines() if "apt-get install" in x]
    expect(len(line) == 1, "not root: one apt line", err)
    named = set(line[0].split("--no-install-recommends")[1].split())
    want = set(COMMON + OPTIONAL + ["g++-12"]) - {"libgloo-dev", "python3", "g++", "cmake"}
    expect(named == want, f"not root: the line names {sorted(want)}, got {sorted(named)}", err)
    expect(m.state()["log"] == [], "not root: nothing run", m.state()["log"])
    rc, out, err = m.dev("packages")
    expect(rc == 0 and "compiler: g++-12" in out and "meson: missing (>= " in out, "not root: ./dev packages",
           out + err)


def offline_with_what_it_needs(root):
    # The GPU machines: Ubuntu 24.04, no network, lists never fetched, the tools already there.
    m = Machine(root, "ubuntu2404", installed=COMMON + ["libboost1.83-dev"], offline=True)
    rc, out, err = m.dev("build")
    expect(rc == 0, "offline: ./dev build goes on with what is installed", err)
    expect("apt-get update failed" in err, "offline: says the lists could not be fetched", err)
    expect(m.state()["log"] == ["meson setup CXX=", "meson compile CXX="], "offline: configures and builds",
           m.state()["log"])


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--as":
        sys.exit(fake_command(sys.argv[2], sys.argv[3:]))
    root = os.path.abspath(sys.argv[1])
    for case in [debian12_fresh_root, ubuntu2204_fresh_root, ubuntu2404_fresh_root, not_root_prints_the_line,
                 offline_with_what_it_needs]:
        case(root)
        print(f"ok {case.__name__}")


if __name__ == "__main__":
    main()
