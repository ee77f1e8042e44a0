"""Errors a user can cause (bad flags, bad files, a run that diverged). Each ends the run with its exit
code (docs/command-line.md) and one line."""


class MpmpError(Exception):
    """A problem with the user's input: one line, exit code 2."""

    exit_code = 2
    # True when every rank raised this same error at the same point (a decision made from numbers every
    # rank holds): rank 0 prints it once and every rank exits, with no abort needed.
    shared = False

    def report(self, rank: int) -> str:
        """The line to print: "rank R: " first unless the error is the whole job's."""
        return f"error: {self}" if self.shared else f"rank {rank}: error: {self}"


class ConfigError(MpmpError):
    """A flag or a combination of flags that cannot work."""


class DataError(MpmpError):
    """A token file that is missing, unreadable or does not fit the model."""


class CheckpointError(MpmpError):
    """A checkpoint or interchange file that is missing, corrupt or does not fit."""


class DivergedError(MpmpError):
    """The loss or the gradients became non-finite (or fp16 kept overflowing at the smallest loss
    scale), or a checkpoint about to be written holds non-finite values. Every rank decides it from the
    same all-reduced numbers, so it is shared."""

    exit_code = 4
    shared = True


class StartupErrors(MpmpError):
    """What the ranks found wrong before the first step, gathered on every rank: each distinct message
    once, naming the ranks that found it unless all did (then the whole job's)."""

    shared = True

    def __init__(self, found: dict, world_size: int, exit_code: int):
        """found: {message: [ranks that raised it]}."""
        self.found, self.world_size, self.exit_code = found, world_size, exit_code
        super().__init__("; ".join(found))

    def report(self, rank: int) -> str:
        lines = []
        for message, ranks in self.found.items():
            if len(ranks) == self.world_size:
                lines.append(f"error: {message}")
            else:
                who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
                lines.append(f"{who}: error: {message}")
        return "\n".join(lines)
