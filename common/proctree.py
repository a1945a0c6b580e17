"""The process tree from Linux ``/proc``: who descends from whom, and who is still alive.

Standard library only: :mod:`medfed.common.guard` imports it in every daemon's guard
process. Elsewhere (no ``/proc``) the table is empty: no descendants are found and
:func:`is_alive` is False.
"""

from __future__ import annotations

from pathlib import Path

ZOMBIE = "Z"


def proc_table() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (ppid, pgid, state, start time) for every process (Linux /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0], int(fields[19]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(pid: int, table: dict[int, tuple[int, int, str, int]] | None = None) -> list[int]:
    """All descendants of ``pid``, including those that left its session (Flower's SuperExec)."""
    children: dict[int, list[int]] = {}
    for child, (ppid, *_rest) in (proc_table() if table is None else table).items():
        children.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def live_descendants(pid: int) -> list[int]:
    """:func:`descendants` that are not zombies (a zombie is gone; only its parent's wait is missing)."""
    table = proc_table()
    return [child for child in descendants(pid, table) if table[child][2] != ZOMBIE]


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    entry = proc_table().get(pid)
    return entry is not None and entry[2] != ZOMBIE
