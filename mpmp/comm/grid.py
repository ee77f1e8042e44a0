"""ProcessGrid: the one place that turns a world rank into (dp, pp, tp) coordinates and groups.

Rank order is Megatron's: tp varies fastest, then dp, then pp,

    world_rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so the ranks of a tensor-parallel group are neighbours (on one node, where bandwidth is highest).
Groups: tp (same dp, pp), dp (same tp, pp), pp (same tp, dp; group rank = stage), mp (tp x pp, same
dp: the model-parallel group that holds one whole replica), embed (first and last stage of a
pipeline: the tied embedding's gradient is summed there), world. Pipeline neighbours are computed
here once. Under mixed precision the grid's tp and pp groups carry activations as 16-bit patterns
(`wire`); every other group keeps fp32. `transport` says what carries every group but the world
(comm/factory.py: MPI, NCCL, or NCCL's rules over MPI); the world stays MPI.
"""

from dataclasses import dataclass

from mpmp.comm.group import Group, SelfGroup
from mpmp.errors import ConfigError


@dataclass(frozen=True)
class Coord:
    dp: int
    pp: int
    tp: int


def world_rank(coord: Coord, tp: int, dp: int) -> int:
    return coord.tp + tp * (coord.dp + dp * coord.pp)


def coord_of(rank: int, tp: int, dp: int) -> Coord:
    return Coord(dp=(rank // tp) % dp, pp=rank // (tp * dp), tp=rank % tp)


def check_layout(world_size: int, tp: int, pp: int, dp: int | None = None) -> int:
    """Validate a layout against the world size; returns dp (inferred when None)."""
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, not {value}")
    if dp is None:
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size ({world_size}) must be divisible by tp*pp ({tp}*{pp} = {tp * pp}); "
                f"run with mpirun -n {tp * pp * max(1, world_size // (tp * pp))} or change --tp/--pp"
            )
        dp = world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ConfigError(f"world size ({world_size}) != tp*pp*dp ({tp}*{pp}*{dp} = {tp * pp * dp})")
    return dp


def layout_ranks(tp: int, pp: int, dp: int):
    """(world rank, Coord) of every rank of a layout, in rank order."""
    return [(r, coord_of(r, tp, dp)) for r in range(tp * pp * dp)]


class ProcessGrid:
    def __init__(
        self, tp: int = 1, pp: int = 1, dp: int | None = None, comm=None, wire: str | None = None, transport="mpi"
    ):
        """Build every group from comm (default MPI.COMM_WORLD). Validates before any collective.
        wire: "bf16" or "fp16" for mixed precision's 16-bit activation traffic (tp and pp groups).
        transport: "mpi", "nccl" or "nccl-standin" for every group but the world."""
        if comm is None:
            from mpmp.comm.mpi import MPI

            comm = MPI().COMM_WORLD
        self.world_size = comm.Get_size()
        self.dp = check_layout(self.world_size, tp, pp, dp)
        self.tp, self.pp = tp, pp
        self.rank = comm.Get_rank()
        self.coord = coord_of(self.rank, tp, self.dp)
        self.comm = comm
        self.wire = wire
        self.transport = transport
        self._build(comm)
        self.tp_group.wire = self.pp_group.wire = wire

    def _build(self, comm):
        from mpmp.comm.factory import group_class
        from mpmp.comm.mpi import MPIGroup

        c, tp, pp, dp = self.coord, self.tp, self.pp, self.dp
        make = group_class(self.transport)

        def split(name, color, key, members):
            # Every rank takes part in every Split, and builds its groups, in the same order: no deadlock.
            sub = comm.Split(color, key)
            return make(sub, name, members)

        self.world = MPIGroup(comm, "world")
        self.tp_group = split("tp", c.dp + dp * c.pp, c.tp, self.members(dp=c.dp, pp=c.pp))
        self.dp_group = split("dp", c.tp + tp * c.pp, c.dp, self.members(tp=c.tp, pp=c.pp))
        self.pp_group = split("pp", c.tp + tp * c.dp, c.pp, self.members(tp=c.tp, dp=c.dp))
        mp_members = [world_rank(Coord(c.dp, p, t), tp, dp) for p in range(pp) for t in range(tp)]
        self.mp_group = split("mp", c.dp, c.tp + tp * c.pp, mp_members)
        on_edge = c.pp in (0, pp - 1)
        embed = comm.Split(c.tp + tp * c.dp if on_edge else MPI_UNDEFINED(), c.pp)
        if on_edge and pp > 1:
            ranks = [world_rank(Coord(c.dp, p, c.tp), tp, dp) for p in (0, pp - 1)]
            self.embed_group = make(embed, "embed", ranks)
        else:
            self.embed_group = SelfGroup("embed", self.rank)

    def members(self, tp=None, pp=None, dp=None) -> list[int]:
        """World ranks with the given coordinates fixed, in the order of the free coordinate."""
        out = []
        for p in range(self.pp) if pp is None else [pp]:
            for d in range(self.dp) if dp is None else [dp]:
                for t in range(self.tp) if tp is None else [tp]:
                    out.append(world_rank(Coord(d, p, t), self.tp, self.dp))
        return out

    # ---- pipeline neighbours (group ranks in pp_group, which equal stage numbers) --------------
    @property
    def stage(self) -> int:
        return self.coord.pp

    @property
    def next_stage(self) -> int:
        return (self.coord.pp + 1) % self.pp

    @property
    def prev_stage(self) -> int:
        return (self.coord.pp - 1) % self.pp

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.pp - 1

    def describe(self) -> str:
        """The layout table rank 0 prints at start-up."""
        lines = [
            f"layout: world {self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp} (tp fastest, then dp, then pp)"
        ]
        for p in range(self.pp):
            for d in range(self.dp):
                ranks = self.members(pp=p, dp=d)
                lines.append(f"  stage {p} replica {d}: ranks {ranks}")
        return "\n".join(lines)


class LocalGrid:
    """The grid of a single process (tp = pp = dp = 1) without starting MPI."""

    def __init__(self, wire: str | None = None):
        self.wire = wire  # nothing crosses a process boundary: kept for the trainer's check
        self.transport = "none"
        self.tp = self.pp = self.dp = 1
        self.world_size, self.rank = 1, 0
        self.coord = Coord(0, 0, 0)
        self.comm = None
        g = SelfGroup
        self.world, self.tp_group, self.dp_group = g("world"), g("tp"), g("dp")
        self.pp_group, self.mp_group, self.embed_group = g("pp"), g("mp"), g("embed")

    stage = 0
    next_stage = prev_stage = 0
    is_first_stage = is_last_stage = True
    members = ProcessGrid.members
    describe = ProcessGrid.describe


def MPI_UNDEFINED():
    from mpmp.comm.mpi import MPI

    return MPI().UNDEFINED


__all__ = ["ProcessGrid", "LocalGrid", "Coord", "coord_of", "world_rank", "layout_ranks", "check_layout", "Group"]
