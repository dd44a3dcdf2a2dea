"""eplb's stores from Python and the adapter over a torch.distributed Store (or any object with
set/get/add/wait): the same contract on every one, timeouts as eplb.Timeout naming the key."""

import threading
import time

import pytest

import eplb
from conftest import HAVE_TORCH, run_threads


class DictStore:
    """A store with torch.distributed's method names and no compare_set (the adapter's other path)."""

    def __init__(self):
        self.data = {}
        self.cv = threading.Condition()
        self.calls_without_gil_holder = 0

    def set(self, key, value):
        with self.cv:
            self.data[key] = bytes(value)
            self.cv.notify_all()

    def get(self, key):
        with self.cv:
            return self.data[key]

    def add(self, key, delta):
        with self.cv:
            value = int(self.data.get(key, b"0")) + delta
            self.data[key] = str(value).encode()
            self.cv.notify_all()
            return value

    def wait(self, keys, timeout):
        with self.cv:
            if not self.cv.wait_for(lambda: all(k in self.data for k in keys), timeout.total_seconds()):
                raise RuntimeError("Wait timeout")

    def delete_key(self, key):
        with self.cv:
            return self.data.pop(key, None) is not None

    def num_keys(self):
        with self.cv:
            return len(self.data)


def make_stores(tmp_path):
    stores = {
        "memory": eplb.MemoryStore(),
        "file": eplb.FileStore(str(tmp_path / "store")),
        "tcp": eplb.TCPStore("127.0.0.1", 0, serve=True),
        "prefix": eplb.PrefixStore(eplb.MemoryStore(), "run1"),
        "python": eplb.TorchStore(DictStore()),
    }
    if HAVE_TORCH:
        import torch.distributed as dist

        stores["torch_hash"] = eplb.as_store(dist.HashStore())
    return stores


@pytest.mark.parametrize("name", ["memory", "file", "tcp", "prefix", "python", "torch_hash"])
def test_store_contract(tmp_path, name):
    stores = make_stores(tmp_path)
    if name not in stores:
        pytest.skip("torch is not installed")
    s = stores[name]
    s.set("a", b"\x00bytes\xff")
    assert s.get("a", timeout=5) == b"\x00bytes\xff"
    assert s.add("n", 2) == 2
    assert s.add("n", 5) == 7
    assert s.set_if_absent("k", b"first") == b"first"
    assert s.set_if_absent("k", b"second") == b"first"
    assert s.get("k") == b"first"
    s.delete_key("a")
    with pytest.raises(eplb.Timeout) as info:
        s.get("a", timeout=0.2)
    assert 'a" ' in str(info.value) and info.value.code == "timeout"
    # A get waiting on one thread is answered by a set on another (the GIL is released while waiting).
    got = []
    t = threading.Thread(target=lambda: got.append(s.get("late", timeout=10)))
    t.start()
    time.sleep(0.1)
    s.set("late", b"v")
    t.join(10)
    assert got == [b"v"]


def test_tcp_store_clients_share_the_server():
    server = eplb.TCPStore("127.0.0.1", 0, serve=True)
    client = eplb.TCPStore("127.0.0.1", server.port)
    client.set("x", b"1")
    assert server.get("x") == b"1"
    with pytest.raises(eplb.InvalidArgument, match="port: 0 needs serve=True"):
        eplb.TCPStore("127.0.0.1", 0)
    with pytest.raises(eplb.InvalidArgument, match="port: 70000 is not in 0..65535"):
        eplb.TCPStore("127.0.0.1", 70000, serve=True)


def test_adapter_refuses_objects_without_the_methods():
    with pytest.raises(eplb.InvalidArgument, match="store: object has no add"):
        eplb.TorchStore(type("S", (), {"set": None, "get": None})())


def test_adapter_reports_python_failures_as_transport_errors():
    class Broken(DictStore):
        def add(self, key, delta):
            raise KeyError("disk full")

    with pytest.raises(eplb.Error) as info:
        eplb.TorchStore(Broken()).add("n", 1)
    assert info.value.code == "transport" and "python store add" in str(info.value) and "disk full" in str(info.value)


def test_barrier_across_threads_through_the_adapter():
    s = eplb.TorchStore(DictStore())
    run_threads(4, lambda rank: s.barrier("b", 4, timeout=10))
    with pytest.raises(eplb.Timeout):
        s.barrier("lonely", 2, timeout=0.2)
