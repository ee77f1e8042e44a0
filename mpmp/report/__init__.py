"""Pictures of a run: `python -m mpmp.report --metrics M.jsonl [--trace T.json] [--plan P.json] --out DIR`.

Reads files only (a run's `--metrics` JSONL, its `--trace` Chrome trace, a plan from
`python -m mpmp.plan --json`) and draws PNGs with matplotlib: the timeline of one step, the training
curves, and where the memory and the bytes go. Nothing here starts MPI.

    files.py      readers and checks of the three files (one error line for a bad input)
    steps.py      what a step of the trace holds: its spans per rank, its bubble, bytes per operation
    timeline.py   the per-rank timeline of one step
    curves.py     loss, gradient norm, learning rate, tokens/s and skipped steps against step
    memory.py     memory per rank and bytes per group and operation, a plan's predictions beside
    figure.py     figure sizes, colours and saving
"""
