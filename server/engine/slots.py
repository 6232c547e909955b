"""Which adapter key sits in which device slot: LRU over slots that no running row uses.

Pure bookkeeping (no tensors), owned by the engine thread; the copy into a slot is the engine's job.

A request refused a slot (every slot has running rows) closes one slot for the rest of the admission pass: no new
row joins it, so it drains and the refused request takes it. Otherwise requests queued after it for adapters in
slots keep every slot busy, and a flood of them over max_active_adapters adapters starves any other adapter for
as long as the flood lasts.
"""

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self._keys: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self._users = [0] * num_slots  # running rows per slot
        self._free = list(range(num_slots))
        self._doomed: set[str] = set()  # deactivated while in use: freed when its last row leaves
        self._closed: int | None = None  # draining for a request refused a slot in this admission pass

    def begin_pass(self) -> None:
        """An admission pass starts: every slot is open to new rows until a request is refused one."""
        self._closed = None

    def acquire(self, key: str) -> tuple[int, bool] | None:
        """(slot, whether its weights must be copied in) for a new row using `key`; None if it must wait: all slots
        are busy (the first such refusal of a pass closes a slot), or its slot is closed or doomed."""
        slot = self._keys.get(key)
        if slot is not None and key not in self._doomed and slot != self._closed:
            self._keys.move_to_end(key)
            self._users[slot] += 1
            return slot, False
        if slot is not None:  # draining: doomed (a new version must go elsewhere) or closed
            return None
        if self._free:
            slot = self._free.pop(0)
        else:
            idle = next((k for k, s in self._keys.items() if self._users[s] == 0), None)
            if idle is None:
                if self._closed is None:  # the slot with the fewest rows, least recently used of ties: min keeps
                    self._closed = min(self._keys.values(), key=self._users.__getitem__)  # the first of equals
                return None
            slot = self._keys.pop(idle)
        self._keys[key] = slot
        self._users[slot] += 1
        return slot, True

    def would_take(self, key: str, leaving: int | None = None) -> bool:
        """Whether `acquire(key)` would give a slot now, once a row of slot `leaving` has left (None: none leaves),
        changing nothing: the engine pauses a row for a request only where that request would then take it."""
        slot = self._keys.get(key)
        if slot is not None:
            return key not in self._doomed and slot != self._closed
        return bool(self._free) or any(self._users[s] == (s == leaving) for s in self._keys.values())

    def release(self, slot: int) -> None:
        self._users[slot] -= 1
        if self._users[slot] == 0:
            doomed = next((k for k in self._doomed if self._keys.get(k) == slot), None)
            if doomed is not None:
                self._drop(doomed)

    def deactivate(self, key: str) -> bool:
        """Forget `key`; its slot is free now, or when its last running row leaves. False if not active."""
        slot = self._keys.get(key)
        if slot is None:
            return False
        if self._users[slot]:
            self._doomed.add(key)
        else:
            self._drop(key)
        return True

    def _drop(self, key: str) -> None:
        self._doomed.discard(key)
        self._free.append(self._keys.pop(key))

    def active(self) -> dict[str, int]:
        return {k: s for k, s in self._keys.items() if k not in self._doomed}
