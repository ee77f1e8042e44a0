#!/usr/bin/env bash
# One rank of an MPI test run: rank 0 prints pytest's report; the other ranks keep only stderr, where
# tests/conftest.py writes any failure before aborting the job.
rank="${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}}"
if [ "$rank" = 0 ]; then
    exec python -m pytest -p no:cacheprovider "$@"
else
    exec python -m pytest -p no:cacheprovider "$@" >/dev/null
fi
