# cython: language_level=3
# C-level interface of the embedded ledger, for other Cython/C++ extensions:
#
#     from engine._ledger cimport Ledger, OpRec, ResRec
#     cdef Ledger led = ledger_object
#     led.apply_records(ops_ptr, n, results_ptr, timestamp)   # no Python objects per operation
#
# Build the extension as C++ with the `engine` package directory on the include path (ledger_core.h).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, uintptr_t
from libcpp.vector cimport vector
from libcpp.string cimport string

cdef extern from "ledger_core.h" namespace "zw" nogil:
    cdef packed struct OpRec:
        unsigned char dedup_id[16]
        unsigned char account_id[16]
        unsigned char other_id[16]
        unsigned char amount[16]
        unsigned char expected_a[16]
        unsigned char expected_b[16]
        char currency[8]
        uint8_t kind
        uint8_t flags
        uint16_t group_size
        uint32_t reserved
        uint64_t issued_ms
        uint64_t expires_ms

    cdef packed struct ResRec:
        unsigned char dedup_id[16]
        uint64_t seq_num
        uint16_t code
        uint8_t flags
        uint8_t kind
        uint32_t reserved

    cdef packed struct EvRec:
        uint64_t seq_num
        uint64_t timestamp
        unsigned char dedup_id[16]
        unsigned char account_id[16]
        unsigned char other_id[16]
        unsigned char amount[16]
        unsigned char available[16]
        uint64_t version
        char currency[8]
        uint8_t kind
        uint8_t state
        uint16_t part
        uint16_t parts
        uint16_t code
        uint64_t reserved2

    int64_t validate_ops(const OpRec* ops, uint64_t n, const char** why)
    uint64_t dedup_hash(uint64_t lo, uint64_t hi)

    cdef cppclass AccountView "zw::Core::AccountView":
        unsigned char id[16]
        unsigned char available[16]
        unsigned char lower[16]
        unsigned char upper[16]
        unsigned char reserved[16]
        unsigned char pending_in[16]
        unsigned char pending_out[16]
        int64_t reserved_carry
        int64_t pending_in_carry
        int64_t pending_out_carry
        uint64_t version
        char currency[9]
        uint8_t state
        uint8_t flags
        uint32_t open_items

    cdef cppclass KV "zw::Core::KV":
        unsigned char key[16]
        unsigned char a[16]
        unsigned char b[16]

    cdef cppclass Core:
        Core(uint64_t dedup_retention, uint64_t event_retention, uint32_t accounts_max,
             uint64_t initial_capacity) except +
        uint32_t acc_count
        uint32_t acc_capacity
        uint64_t last_seq
        uint64_t dedup_retention
        uint64_t event_retention
        uint64_t horizon
        uint64_t last_ts
        uint64_t chain_a
        uint64_t chain_b
        uint64_t seq_before_commands
        uint64_t oldest_issued()
        uint64_t index_bytes()
        int64_t validate(const OpRec* ops, uint64_t n, const char** why)
        void apply(const OpRec* ops, uint64_t n, ResRec* out, uint64_t ts) except +
        void reservations_of(const unsigned char* id, vector[KV]& out) except +
        void pending_of(const unsigned char* id, vector[KV]& out) except +
        void totals(const char* currency8, unsigned char* lo4x16, int64_t* carry4)
        string serialize() except +
        const char* check_invariants() except +
        const char* deserialize(const char* p, const char* end) except +
        bint view(const unsigned char* id, AccountView* v)
        int64_t find_bytes(const unsigned char* id)
        uint64_t event_count(uint64_t first, uint64_t last)
        void copy_events(uint64_t first, uint64_t last, EvRec* out)
        void copy_seq_hashes(uint64_t first, uint64_t last, uint64_t* out, uint64_t* ts_first, uint64_t* ts_last)
        uint64_t dedup_size()
        uint64_t dedup_overflow()
        uint64_t dedup_bytes()


cdef class _CommandApi:
    # The per-call commands, built into _opbuf; _call decides what happens to the built records.
    cdef object _opbuf             # scratch op records for the per-call API
    cdef OpRec* _ops
    cdef object _call(self, uint64_t n, uint64_t timestamp)
    cdef OpRec* _op(self, uint64_t i, object dedup_id, uint8_t kind) except NULL
    cdef uint64_t _ts(self, object timestamp) except? 0
    cdef object _account_op(self, uint8_t kind, object dedup_id, object account_id, object timestamp)
    cdef uint64_t _group(self, uint8_t kind, object dedup_id, object specs, object preconditions) except 0
    cdef object _txn_op(self, uint8_t kind, object dedup_id, object txn_id, object timestamp)


cdef class OpEncoder(_CommandApi):
    pass


cdef class Ledger(_CommandApi):
    cdef Core* core
    cdef object _resbuf            # scratch result records for the per-call API
    cdef ResRec* _res
    cdef readonly uint64_t dedup_retention
    cdef readonly uint64_t event_retention

    cdef int _check_batch(self, const OpRec* ops, uint64_t n) except -1
    # Validate, make room, apply: the C-level entry point for embedders. Raises ValueError on a malformed
    # batch (nothing applied). Runs without the GIL-free guarantee: the ledger is single-threaded.
    cdef int apply_records(self, const OpRec* ops, uint64_t n, ResRec* out, uint64_t timestamp) except -1
    cdef object _lookup(self, const unsigned char* key)
