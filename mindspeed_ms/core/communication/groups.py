"""Process groups and the distributed environment.

A :class:`ProcessGroup` names a set of global ranks and the backend communicator that
connects them. Groups of size one never touch the backend, so single-process code (unit
tests, notebooks) runs every collective as the identity without ``msrun``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Sequence, Tuple

__all__ = [
    "ProcessGroup",
    "launched_by_msrun",
    "is_initialized",
    "init_distributed",
    "get_world_size",
    "get_rank",
    "world_group",
    "new_group",
    "device_target",
]

_lock = threading.Lock()
_created_groups: Dict[Tuple[int, ...], "ProcessGroup"] = {}


def launched_by_msrun() -> bool:
    """Whether this process runs inside a multi-process launch (msrun sets the rank environment)."""
    if os.environ.get("MS_ROLE") == "MS_WORKER":
        return True
    return int(os.environ.get("RANK_SIZE", "1") or 1) > 1


def is_initialized() -> bool:
    """Whether ``mindspore.communication.init()`` has completed in this process."""
    try:
        from mindspore.communication import _comm_helper  # pylint: disable=import-outside-toplevel
    except ImportError:  # pragma: no cover - depends on the MindSpore build
        return False
    checker = getattr(_comm_helper, "_is_initialized", None)
    if checker is None:  # pragma: no cover
        return False
    try:
        return bool(checker())
    except Exception:  # pylint: disable=broad-except
        return False


def init_distributed() -> None:
    """Initialise MindSpore communication when launched by msrun; a no-op otherwise or when done."""
    if launched_by_msrun() and not is_initialized():
        from mindspore.communication import init  # pylint: disable=import-outside-toplevel

        init()


def get_world_size() -> int:
    """Number of ranks in the job (1 without a distributed launch)."""
    if not is_initialized():
        return 1
    from mindspore.communication import get_group_size  # pylint: disable=import-outside-toplevel

    return int(get_group_size())


def get_rank() -> int:
    """Global rank of this process (0 without a distributed launch)."""
    if not is_initialized():
        return 0
    from mindspore.communication import get_rank as _ms_get_rank  # pylint: disable=import-outside-toplevel

    return int(_ms_get_rank())


def device_target() -> str:
    """The MindSpore device target of this process: 'CPU', 'Ascend' or 'GPU'."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    try:
        target = ms.get_context("device_target")
    except Exception:  # pylint: disable=broad-except  # pragma: no cover
        target = "CPU"
    return str(target)


@dataclass(frozen=True)
class ProcessGroup:
    """A set of global ranks that communicate together.

    Attributes:
        ranks: Global ranks in group order; the position of a rank is its rank in the group.
        name: The backend communicator name (``None`` for groups of size one, which never
            communicate).
        kind: A short label used in error messages and group names (``"tp"``, ``"dp"``, ...).
    """

    ranks: Tuple[int, ...]
    name: Optional[str] = None
    kind: str = "group"
    _index: Dict[int, int] = field(default=None, repr=False, compare=False, hash=False)  # type: ignore[assignment]

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "_index", {r: i for i, r in enumerate(self.ranks)})
        if len(self._index) != len(self.ranks):
            raise ValueError(f"ProcessGroup ranks must be distinct, got {list(self.ranks)}")

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's position in the group."""
        return self.group_rank(get_rank())

    def group_rank(self, global_rank: int) -> int:
        """Position of ``global_rank`` in the group (ValueError if it is not a member)."""
        try:
            return self._index[int(global_rank)]
        except KeyError:
            raise ValueError(
                f"rank {global_rank} is not a member of the {self.kind} group {list(self.ranks)}"
            ) from None

    def global_rank(self, group_rank: int) -> int:
        """Global rank of the member at position ``group_rank``."""
        return self.ranks[group_rank]

    def __contains__(self, global_rank: int) -> bool:
        return int(global_rank) in self._index


def _group_name(kind: str, ranks: Sequence[int]) -> str:
    body = "-".join(str(r) for r in ranks)
    if len(body) > 64:
        body = hashlib.sha1(body.encode()).hexdigest()[:16] + f"-n{len(ranks)}"
    return f"msp_{kind}_{body}"


def world_group() -> ProcessGroup:
    """The group of all ranks (the backend's world communicator)."""
    size = get_world_size()
    if size == 1:
        return ProcessGroup((0,), None, "world")
    from mindspore.communication import GlobalComm  # pylint: disable=import-outside-toplevel

    return ProcessGroup(tuple(range(size)), GlobalComm.WORLD_COMM_GROUP, "world")


def new_group(ranks: Iterable[int], kind: str = "group") -> ProcessGroup:
    """Create (or reuse) the communicator for ``ranks``.

    Every member must call this for the same ranks, in the same order relative to its other
    group creations. Non-members get a descriptor that cannot communicate. A group equal to the
    whole world reuses the world communicator; groups of size one never create one.

    Args:
        ranks: Global ranks, in group order.
        kind: Label for error messages and the communicator name.

    Returns:
        The :class:`ProcessGroup`.
    """
    ranks = tuple(int(r) for r in ranks)
    world = get_world_size()
    bad = [r for r in ranks if r < 0 or r >= world]
    if bad:
        raise ValueError(f"{kind} group ranks {list(ranks)} contain ranks outside the world of size {world}: {bad}")
    if len(ranks) == 1:
        return ProcessGroup(ranks, None, kind)
    if ranks == tuple(range(world)):
        grp = world_group()
        return ProcessGroup(grp.ranks, grp.name, kind)
    with _lock:
        cached = _created_groups.get(ranks)
        if cached is not None:
            return ProcessGroup(ranks, cached.name, kind)
        name = _group_name(kind, ranks)
        if get_rank() in ranks:
            from mindspore.communication import create_group  # pylint: disable=import-outside-toplevel

            create_group(name, list(ranks))
        grp = ProcessGroup(ranks, name, kind)
        _created_groups[ranks] = grp
        return grp
