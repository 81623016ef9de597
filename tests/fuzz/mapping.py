"""The runner's own mapping of a table: to watch the set-up and to write the garbage."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

import posix_ipc

from mpflight._layout import H_NONCE, R_PID, R_SLOT, S_KEY, S_KEY_LEN, S_SEGMENT_TOKEN, S_WAITERS, Geometry
from mpflight._locks import object_name, segment_name
from tests.fuzz.garbage import Live, Write
from tests.fuzz.scene import FREE


class Raw:
    """The runner's own mapping of a table: to watch the set-up and to write the garbage."""

    def __init__(self, name: str, slots: int) -> None:
        self.name = name
        self.geo = Geometry.for_slots(slots)
        self.fd = posix_ipc.SharedMemory(object_name(name), 0).fd
        self.mm = mmap.mmap(self.fd, self.geo.size)

    def pass_the_lock(self) -> None:
        """Take and drop the table lock: whoever held it when this was called has left it since."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def int(self, off: int, width: int) -> int:
        return int.from_bytes(self.mm[off : off + width], "little")

    def f64(self, off: int) -> float:
        value: float = struct.unpack_from("<d", self.mm, off)[0]
        return value

    def state(self, index: int) -> int:
        return self.mm[self.geo.state_map + index]

    def waiters(self, index: int) -> int:
        return self.int(self.geo.slot(index) + S_WAITERS, 4)

    def find(self, key: str) -> int:
        """The slot of the (non-FREE) call for key, or -1."""
        raw = key.encode()
        for i in range(self.geo.slots):
            off = self.geo.slot(i)
            if (
                self.state(i) != FREE
                and self.int(off + S_KEY_LEN, 8) == len(raw)
                and self.mm[off + S_KEY : off + S_KEY + len(raw)] == raw
            ):
                return i
        return -1

    def record_of(self, pid: int, index: int) -> int:
        g = self.geo
        for r in range(g.records):
            off = g.record(r)
            if self.mm[g.record_map + r] == 1 and (self.int(off + R_PID, 4), self.int(off + R_SLOT, 4)) == (
                pid,
                index,
            ):
                return r
        raise AssertionError(f"no record of pid {pid} on slot {index}")

    def apply(self, w: Write, live: Live) -> None:
        g = self.geo

        def at(roles: dict[str, int]) -> int:
            return roles[w.which] if isinstance(w.which, str) else w.which

        area, xor = w.area.rstrip("^"), w.area.endswith("^")
        if area == "segment":
            nonce = int.from_bytes(self.mm[H_NONCE : H_NONCE + 4], "little")
            big = live.slots["big"]
            token = self.int(g.slot(big) + S_SEGMENT_TOKEN, 8)
            name = segment_name(self.name, nonce, big, token)
            shm = posix_ipc.SharedMemory(name, 0)
            try:
                with mmap.mmap(shm.fd, 0) as seg:
                    self._put(seg, w.field, w.data, xor)
            finally:
                shm.close_fd()
            return
        off = {
            "header": lambda: w.field,
            "table": lambda: w.field,
            "state": lambda: g.state_map + at(live.slots),
            "rmap": lambda: g.record_map + at(live.records),
            "home": lambda: g.home_counts + 4 * at(live.homes),
            "slot": lambda: g.slot(at(live.slots)) + w.field,
            "record": lambda: g.record(at(live.records)) + w.field,
        }[area]()
        self._put(self.mm, off, w.data, xor)

    @staticmethod
    def _put(mm: mmap.mmap, off: int, data: bytes, xor: bool) -> None:
        data = data[: max(0, len(mm) - off)]
        if xor:
            data = bytes(a ^ b for a, b in zip(mm[off : off + len(data)], data, strict=True))
        mm[off : off + len(data)] = data

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)
