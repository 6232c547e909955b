"""Which adapter key sits in which device slot: LRU over slots that no running row uses.

Pure bookkeeping (no tensors), owned by the engine thread; the copy into a slot is the engine's job.
"""

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self._keys: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self._users = [0] * num_slots  # running rows per slot
        self._free = list(range(num_slots))
        self._doomed: set[str] = set()  # deactivated while in use: freed when its last row leaves

    def acquire(self, key: str) -> tuple[int, bool] | None:
        """(slot, whether its weights must be copied in) for a new row using `key`; None if all slots are busy."""
        slot = self._keys.get(key)
        if slot is not None and key not in self._doomed:
            self._keys.move_to_end(key)
            self._users[slot] += 1
            return slot, False
        if slot is not None:  # doomed but still in use: a new version must go elsewhere
            return None
        if self._free:
            slot = self._free.pop(0)
        else:
            idle = next((k for k, s in self._keys.items() if self._users[s] == 0), None)
            if idle is None:
                return None
            slot = self._keys.pop(idle)
        self._keys[key] = slot
        self._users[slot] += 1
        return slot, True

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
