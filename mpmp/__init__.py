"""mpmp: model parallelism you can read.

GPT-2 with hand-written forward and backward passes on NumPy/CuPy arrays, split over MPI ranks by
tensor, pipeline and data parallelism, with every byte of communication explicit.
"""

from mpmp import _setup

# Must run before NumPy is first imported so that OpenBLAS starts with the right pool size.
_setup.configure()
_setup.configure_allocator()

__version__ = "0.2.0"

__all__ = ["__version__"]
