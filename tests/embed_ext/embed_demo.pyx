# distutils: language = c++
# cython: language_level=3
"""A tiny extension that drives the ledger from C: it cimports engine._ledger and applies a batch of op
records through Ledger.apply_records, with no Python object per operation."""
from libc.stdint cimport uint64_t, uintptr_t

from engine._ledger cimport Ledger, OpRec, ResRec


def apply_from_c(Ledger ledger, ops, results, uint64_t timestamp):
    cdef const OpRec* op = <const OpRec*><uintptr_t>ops.ctypes.data
    cdef ResRec* res = <ResRec*><uintptr_t>results.ctypes.data
    cdef uint64_t n = ops.shape[0]
    ledger.apply_records(op, n, res, timestamp)
    cdef uint64_t ok = 0, i
    for i in range(n):
        if res[i].code == 0:
            ok += 1
    return ok
