"""ProcessGrid: the one place that turns a world rank into (dp, pp, tp, cp) coordinates and groups.

Rank order is Megatron's: tp varies fastest, then cp (context parallelism), then dp, then pp,

    world_rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

so the ranks of a tensor-parallel group are neighbours (on one node, where bandwidth is highest), and
with cp = 1 the order is `tp_rank + tp * (dp_rank + dp * pp_rank)`.
Groups: tp (same cp, dp, pp), cp (same tp, dp, pp: the ring of ring attention), dp (same tp, cp, pp),
dp_cp (dp x cp, same tp, pp: Megatron's data-parallel group with context parallelism; its ranks hold
the same weights, so gradients are summed and ZeRO-1 shards over it; the dp group itself when cp = 1),
pp (same tp, cp, dp; group rank = stage), mp (tp x pp, same dp, cp: the model-parallel group that holds
one whole replica), embed (first and last stage of a pipeline: the tied embedding's gradient is summed
there), world. Pipeline neighbours and the sequence chunks of each cp rank are computed here once.
Under mixed precision the grid's tp, cp and pp groups carry activations as 16-bit patterns (`wire`);
every other group keeps fp32. `transport` says what carries every group but the world
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
    cp: int = 0


def world_rank(coord: Coord, tp: int, dp: int, cp: int = 1) -> int:
    return coord.tp + tp * (coord.cp + cp * (coord.dp + dp * coord.pp))


def coord_of(rank: int, tp: int, dp: int, cp: int = 1) -> Coord:
    return Coord(dp=(rank // (tp * cp)) % dp, pp=rank // (tp * cp * dp), tp=rank % tp, cp=(rank // tp) % cp)


def context_chunks(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two of the sequence's 2·cp equal chunks that cp rank r holds: r and 2·cp - 1 - r. Under the
    causal mask chunk j attends to j + 1/2 chunks of keys, so every rank gets the same work: 2·cp + 1
    half-chunk blocks of scores (the load balancing of Megatron-Core's context parallelism,
    `get_batch_on_this_cp_rank`)."""
    return cp_rank, 2 * cp - 1 - cp_rank


def check_layout(world_size: int, tp: int, pp: int, dp: int | None = None, cp: int = 1) -> int:
    """Validate a layout against the world size; returns dp (inferred when None)."""
    for flag, value in (("--tp", tp), ("--pp", pp), ("--cp", cp)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, not {value}")
    mp = tp * pp * cp  # the ranks of one replica
    names = "tp*pp" if cp == 1 else "tp*pp*cp"
    sizes = f"{tp}*{pp}" if cp == 1 else f"{tp}*{pp}*{cp}"
    if dp is None:
        if world_size % mp:
            raise ConfigError(
                f"world size ({world_size}) must be divisible by {names} ({sizes} = {mp}); "
                f"run with mpirun -n {mp * max(1, world_size // mp)} or change --tp/--pp" + ("/--cp" if cp > 1 else "")
            )
        dp = world_size // mp
    if mp * dp != world_size:
        raise ConfigError(f"world size ({world_size}) != {names}*dp ({sizes}*{dp} = {mp * dp})")
    return dp


def layout_ranks(tp: int, pp: int, dp: int, cp: int = 1):
    """(world rank, Coord) of every rank of a layout, in rank order."""
    return [(r, coord_of(r, tp, dp, cp)) for r in range(tp * pp * dp * cp)]


class ProcessGrid:
    def __init__(
        self,
        tp: int = 1,
        pp: int = 1,
        dp: int | None = None,
        comm=None,
        wire: str | None = None,
        transport="mpi",
        *,
        cp: int = 1,
    ):
        """Build every group from comm (default MPI.COMM_WORLD). Validates before any collective.
        wire: "bf16" or "fp16" for mixed precision's 16-bit activation traffic (tp, cp and pp groups).
        transport: "mpi", "nccl" or "nccl-standin" for every group but the world.
        cp: context-parallel ranks (ring attention), between tp and dp in the rank order."""
        if comm is None:
            from mpmp.comm.mpi import MPI

            comm = MPI().COMM_WORLD
        self.world_size = comm.Get_size()
        self.dp = check_layout(self.world_size, tp, pp, dp, cp)
        self.tp, self.pp, self.cp = tp, pp, cp
        self.rank = comm.Get_rank()
        self.coord = coord_of(self.rank, tp, self.dp, cp)
        self.comm = comm
        self.wire = wire
        self.transport = transport
        self._build(comm)
        self.tp_group.wire = self.pp_group.wire = self.cp_group.wire = wire

    def _rank(self, coord: Coord) -> int:
        return world_rank(coord, self.tp, self.dp, self.cp)

    def _build(self, comm):
        from mpmp.comm.factory import group_class
        from mpmp.comm.mpi import MPIGroup

        c, tp, pp, dp, cp = self.coord, self.tp, self.pp, self.dp, self.cp
        make = group_class(self.transport)

        def split(name, color, key, members):
            # Every rank takes part in every Split, and builds its groups, in the same order: no deadlock.
            sub = comm.Split(color, key)
            return make(sub, name, members)

        replica = c.dp + dp * c.pp  # the (dp, pp) position; with tp and cp it names every group
        self.world = MPIGroup(comm, "world")
        self.tp_group = split("tp", c.cp + cp * replica, c.tp, self.members(cp=c.cp, dp=c.dp, pp=c.pp))
        self.dp_group = split("dp", c.tp + tp * (c.cp + cp * c.pp), c.dp, self.members(tp=c.tp, cp=c.cp, pp=c.pp))
        self.pp_group = split("pp", c.tp + tp * (c.cp + cp * c.dp), c.pp, self.members(tp=c.tp, cp=c.cp, dp=c.dp))
        mp_members = [self._rank(Coord(c.dp, p, t, c.cp)) for p in range(pp) for t in range(tp)]
        self.mp_group = split("mp", c.cp + cp * c.dp, c.tp + tp * c.pp, mp_members)
        if cp > 1:  # with cp = 1 no communicator is made: the layouts of before keep their Splits
            self.cp_group = split("cp", c.tp + tp * replica, c.cp, self.members(tp=c.tp, dp=c.dp, pp=c.pp))
            dp_cp_members = self.members(tp=c.tp, pp=c.pp)  # in rank order: cp fastest, then dp
            self.dp_cp_group = split("dp_cp", c.tp + tp * c.pp, c.cp + cp * c.dp, dp_cp_members)
        else:
            self.cp_group = SelfGroup("cp", self.rank)
            self.dp_cp_group = self.dp_group
        on_edge = c.pp in (0, pp - 1)
        embed = comm.Split(c.tp + tp * (c.cp + cp * c.dp) if on_edge else MPI_UNDEFINED(), c.pp)
        if on_edge and pp > 1:
            ranks = [self._rank(Coord(c.dp, p, c.tp, c.cp)) for p in (0, pp - 1)]
            self.embed_group = make(embed, "embed", ranks)
        else:
            self.embed_group = SelfGroup("embed", self.rank)

    def members(self, tp=None, pp=None, dp=None, cp=None) -> list[int]:
        """World ranks with the given coordinates fixed, in rank order of the free coordinates."""
        out = []
        for p in range(self.pp) if pp is None else [pp]:
            for d in range(self.dp) if dp is None else [dp]:
                for k in range(self.cp) if cp is None else [cp]:
                    for t in range(self.tp) if tp is None else [tp]:
                        out.append(world_rank(Coord(d, p, t, k), self.tp, self.dp, self.cp))
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
        if self.cp == 1:
            head = f"layout: world {self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp} (tp fastest, then dp, then pp)"
        else:
            head = (
                f"layout: world {self.world_size} = tp {self.tp} x cp {self.cp} x pp {self.pp} x dp {self.dp} "
                "(tp fastest, then cp, then dp, then pp)"
            )
        lines = [head]
        for p in range(self.pp):
            for d in range(self.dp):
                if self.cp == 1:
                    lines.append(f"  stage {p} replica {d}: ranks {self.members(pp=p, dp=d)}")
                    continue
                rings = ", ".join(f"{self.members(pp=p, dp=d, cp=k)} (cp {k})" for k in range(self.cp))
                lines.append(f"  stage {p} replica {d}: ranks {rings}")
        return "\n".join(lines)


class LocalGrid:
    """The grid of a single process (tp = pp = dp = 1) without starting MPI."""

    def __init__(self, wire: str | None = None):
        self.wire = wire  # nothing crosses a process boundary: kept for the trainer's check
        self.transport = "none"
        self.tp = self.pp = self.dp = self.cp = 1
        self.world_size, self.rank = 1, 0
        self.coord = Coord(0, 0, 0)
        self.comm = None
        g = SelfGroup
        self.world, self.tp_group, self.dp_group = g("world"), g("tp"), g("dp")
        self.pp_group, self.mp_group, self.embed_group = g("pp"), g("mp"), g("embed")
        self.cp_group, self.dp_cp_group = g("cp"), self.dp_group

    stage = 0
    next_stage = prev_stage = 0
    is_first_stage = is_last_stage = True
    members = ProcessGrid.members
    describe = ProcessGrid.describe


def MPI_UNDEFINED():
    from mpmp.comm.mpi import MPI

    return MPI().UNDEFINED


__all__ = [
    "ProcessGrid",
    "LocalGrid",
    "Coord",
    "coord_of",
    "world_rank",
    "layout_ranks",
    "check_layout",
    "context_chunks",
    "Group",
]
