// zwallet ledger core: one shard's account state machine.
//
// Pure: no I/O, no clock, no randomness. The caller (engine/_ledger.pyx) owns the account and hash-slot
// memory (numpy arrays) and grows it before a batch; everything else lives in C++ containers here.
// The layouts of OpRec / ResRec / EvRec mirror engine/records.py (checked at import time).
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <new>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace zw {

typedef __int128 i128;
typedef unsigned __int128 u128;

static const i128 I128_MAX = (i128)(((u128)1 << 127) - 1);
static const i128 I128_MIN = -I128_MAX - 1;

enum Kind : uint8_t {
    K_CREATE_ACCOUNT = 1, K_DELETE_ACCOUNT = 2, K_LOCK_ACCOUNT = 3, K_UNLOCK_ACCOUNT = 4,
    K_UPDATE_ACCOUNT_CONFIG = 5, K_TRANSFER = 6, K_BATCH_BALANCE = 7, K_RESERVE = 8, K_RELEASE = 9,
    K_TCC_TRY = 10, K_TCC_CONFIRM = 11, K_TCC_CANCEL = 12, K_COMPENSATE = 13, K_SPEC = 14,
    K_PRECONDITION = 15, K_MAX = 15
};

enum Code : uint16_t {
    OK = 0, ACCOUNT_NOT_FOUND = 1, ACCOUNT_ALREADY_EXISTS = 2, INVALID_ACCOUNT_STATE = 3,
    BALANCE_LIMIT_EXCEEDED = 4, CURRENCY_MISMATCH = 5, INVALID_AMOUNT = 6, PRECONDITION_FAILED = 7,
    RESERVATION_NOT_FOUND = 8, RESERVATION_INSUFFICIENT = 9, TXN_NOT_FOUND = 10, TXN_ALREADY_EXISTS = 11,
    TXN_ALREADY_CONFIRMED = 12, TXN_ALREADY_CANCELLED = 13, BALANCE_NOT_ZERO = 14,
    INVALID_STATE_TRANSITION = 15, OVERFLOW = 16, SAME_ACCOUNT = 17, ORIGINAL_COMPENSATED = 18,
    BATCH_TOO_LARGE = 19, NULL_COMPENSATED = 20, NOT_COMPENSATABLE = 21, INVALID_LIMITS = 22,
    INVALID_CURRENCY = 23, INVALID_ID = 24, DEDUP_EXPIRED = 25, ISSUED_IN_FUTURE = 26,
    OPEN_ITEMS_LIMIT_EXCEEDED = 27, ACCOUNT_CAPACITY_EXCEEDED = 28, NULL_CANCELLED = 29, TXN_EXPIRED = 30
};
// The codes of an applied command (it gets a seq and an event); every other code is a rejection.
static inline bool is_success(uint16_t c) { return c == OK || c == NULL_COMPENSATED || c == NULL_CANCELLED; }

enum State : uint8_t { NORMAL = 0, LOCKED = 1, DELETED = 2 };

enum OpFlag : uint8_t {
    F_HAS_A = 1, F_HAS_B = 2, F_LOWER_UNBOUNDED = 4, F_UPPER_UNBOUNDED = 8, F_FULL_RELEASE = 16
};
enum AccountFlag : uint8_t { A_LOWER_UNBOUNDED = 1, A_UPPER_UNBOUNDED = 2 };

static const uint32_t BATCH_SIZE_MAX = 8190;
static const uint32_t GROUP_SPECS_MAX = 1024;
// A command may say it was issued at most this far ahead of the entry's (leader's) time: bounds how far one
// command can push the dedup horizon (see Core::horizon) ahead of honest clients' clocks.
static const uint64_t ISSUED_AHEAD_MAX_MS = 60000;
// Reservations plus open TCC pending entries on one account (each is a node in an ordered map; the
// account's delete and every read of it walk them).
static const uint32_t OPEN_ITEMS_MAX_DEFAULT = 4096;
// TCC expiry: the event records the expiry of due tries may write at one entry time (ts), over all the apply
// calls stamped with it (a node applies an entry batch by batch, and its event ring must hold every event of
// an entry: see ledger_machine.NODE_EVENT_RETENTION). A try has at most GROUP_SPECS_MAX specs, so every entry
// time with a due try expires at least one. The rest stay due and expire at the next entry times.
static const uint64_t EXPIRY_RECORDS_PER_TS_MAX = 8192;
// A due try whose cancel is refused (OVERFLOW, or BALANCE_LIMIT_EXCEEDED: money came into the account since
// the try, so giving its pending_out back would pass the upper limit) is tried again this much later.
static const uint64_t EXPIRY_RETRY_MS = 1000;

#pragma pack(push, 1)
struct OpRec {
    unsigned char dedup_id[16], account_id[16], other_id[16], amount[16], expected_a[16], expected_b[16];
    char currency[8];
    uint8_t kind, flags;
    uint16_t group_size;
    uint32_t reserved;
    uint64_t issued_ms;         // when the command was first issued (kept across retries); group: header's
    uint64_t expires_ms;        // TCC_TRY header: cancelled by the ledger at an entry time >= this (0: never);
                                // must be 0 on every other record
};
struct ResRec {
    unsigned char dedup_id[16];
    uint64_t seq_num;
    uint16_t code;
    uint8_t flags, kind;
    uint32_t reserved;
};
struct EvRec {
    uint64_t seq_num, timestamp;
    unsigned char dedup_id[16], account_id[16], other_id[16], amount[16], available[16];
    uint64_t version;
    char currency[8];
    uint8_t kind, state;
    uint16_t part, parts, code;     // code: the command's result (OK, NULL_COMPENSATED, NULL_CANCELLED), or
                                    // TXN_EXPIRED for the ledger's own cancel of an expired try
    uint64_t reserved2;
};
#pragma pack(pop)
static_assert(sizeof(OpRec) == 128, "op record layout");
static_assert(sizeof(ResRec) == 32, "result record layout");
static_assert(sizeof(EvRec) == 128, "event record layout");

// One account: 96 bytes, hot fields first. Stored in a numpy-backed array owned by the Cython class.
struct Account {
    u128 id;
    i128 available;
    i128 lower, upper;          // meaningful unless the matching A_*_UNBOUNDED flag is set
    uint64_t version;
    char currency[8];
    uint8_t state, flags;
    uint16_t pad0;
    uint32_t open_items;        // reservations + TCC pending entries on this account (delete needs 0)
    uint64_t pad1;
};
static_assert(sizeof(Account) == 96, "account layout");

static inline u128 ld_u(const unsigned char* p) { u128 v; memcpy(&v, p, 16); return v; }
static inline i128 ld_i(const unsigned char* p) { i128 v; memcpy(&v, p, 16); return v; }
static inline void st_u(unsigned char* p, u128 v) { memcpy(p, &v, 16); }
static inline void st_i(unsigned char* p, i128 v) { memcpy(p, &v, 16); }

// Ask for transparent huge pages on a big table (random access into it is TLB-bound otherwise).
static inline void advise_huge(void* p, size_t bytes) {
    const uintptr_t huge = 2u << 20;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (hi > lo) madvise((void*)lo, hi - lo, MADV_HUGEPAGE);
}

// A read prefetch the optimizer cannot drop (GCC 12 discarded __builtin_prefetch in these loops).
static inline void prefetch(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*(const char*)p)); }

static inline uint64_t hmix(u128 k) {
    uint64_t lo = (uint64_t)k, hi = (uint64_t)(k >> 64);
    uint64_t x = lo ^ (hi * 0x9E3779B97F4A7C15ULL) ^ (hi >> 29);
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}
struct H128 { size_t operator()(const u128& k) const { return (size_t)hmix(k); } };

// The event store's 64-bit hash of a dedup id (engine/service/event_store.py `_mix`/`dedup_hashes`, in numpy):
// its durable dedup index holds these, so the two must stay bit for bit the same (tests/test_ledger_index.py
// pins it on random ids) or every index block already written would stop finding its ids.
static inline uint64_t dedup_hash(uint64_t lo, uint64_t hi) {
    uint64_t x = lo ^ (hi * 0x9E3779B97F4A7C15ULL);
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 29;
    return x;
}

// A fixed-size array in its own anonymous mapping: zeroed, and backed by memory only where touched, so a
// window sized for its full retention costs nothing until it fills, and never has to grow (growing by
// doubling copied, and first touched, tens of megabytes in one apply call: stalls of 40-300 ms).
template <class T> struct MappedArray {
    T* p = nullptr;
    size_t n = 0;
    MappedArray() = default;
    MappedArray(const MappedArray&) = delete;
    MappedArray& operator=(const MappedArray&) = delete;
    ~MappedArray() { release(); }
    void release() { if (p) munmap((void*)p, bytes()); p = nullptr; n = 0; }
    size_t bytes() const { return n * sizeof(T); }
    // huge: ask for transparent huge pages (for randomly accessed tables, where 4K pages cost a TLB miss
    // per access; a sequentially written ring does not need them)
    void allocate(size_t count, bool huge) {
        release();
        void* m = mmap(nullptr, count * sizeof(T), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) throw std::bad_alloc();
        if (huge) advise_huge(m, count * sizeof(T));
        p = (T*)m; n = count;
    }
    T& operator[](size_t i) { return p[i]; }
    const T& operator[](size_t i) const { return p[i]; }
    size_t size() const { return n; }
};

// A sum of i128 values that may not fit in i128 (e.g. many large reservations): value = lo + carry * 2^128.
struct Wide {
    i128 lo = 0;
    int64_t carry = 0;
    void add(i128 v) { i128 r; if (__builtin_add_overflow(lo, v, &r)) carry += v > 0 ? 1 : -1; lo = r; }
};

// What the dedup table remembers of a command: enough to answer a retry and to undo a transfer.
enum DedupFlag : uint8_t { D_COMPENSATED = 1, D_NULL_COMPENSATED = 2 };
struct Dedup {
    uint64_t seq;
    uint16_t code;
    uint8_t kind, flags;
    uint32_t from_idx, to_idx;  // TRANSFER applied OK: inverse data
    uint8_t side;               // index bookkeeping (not state): kept in the side map, see Core::remember
    uint64_t issued;            // the command's issued_ms: evicting it moves the horizon past it
    i128 amount;
};
static_assert(sizeof(Dedup) == 48, "dedup entry: one cache line with its id");
struct Pending { i128 in, out; };
// TXN_NULL_CANCELLED: a tombstone, a cancel of a txn never tried (so its late try is refused)
enum TxnState : uint8_t { TXN_TRIED = 1, TXN_CONFIRMED = 2, TXN_CANCELLED = 3, TXN_NULL_CANCELLED = 4 };
struct Spec { uint32_t idx; i128 amount; };
struct Txn {
    uint8_t state;
    uint64_t expires_ms = 0;    // TRIED: 0 never, else not confirmable at an entry time >= it
    uint64_t due_ms = 0;        // TRIED with expires_ms: its key in Core::expiry (expires_ms, later on a retry)
    std::vector<Spec> specs;
};
// A finished txn as the finished window remembers it; horizon_ms: a tombstone's time (its cancel's issue
// time or its entry time, the later; 0 for any other finished txn). See Core::txn_finished.
struct Finished { u128 id; uint64_t horizon_ms; };
typedef std::pair<uint64_t, u128> DueKey;        // (due_ms, txn_id)
typedef std::pair<uint32_t, u128> IdxKey;

static inline bool valid_currency(const char* c) {
    if (c[0] == 0) return false;
    int i = 0;
    for (; i < 8 && c[i]; i++) if ((unsigned char)c[i] < 0x21 || (unsigned char)c[i] > 0x7E) return false;
    for (; i < 8; i++) if (c[i] != 0) return false;
    return true;
}

// Structural check of a batch (stateless): -1 if well-formed, else the index of the first bad record
// and *why. apply() requires a batch that passed it.
inline int64_t validate_ops(const OpRec* ops, uint64_t n, const char** why) {
    if (n > BATCH_SIZE_MAX) { *why = "batch larger than BATCH_SIZE_MAX"; return 0; }
    uint64_t i = 0;
    while (i < n) {
        const OpRec& o = ops[i];
        if (o.kind == 0 || o.kind > K_MAX) { *why = "unknown operation kind"; return (int64_t)i; }
        if (o.reserved != 0) { *why = "reserved bytes must be zero"; return (int64_t)i; }
        if (o.expires_ms != 0 && o.kind != K_TCC_TRY) {
            *why = "expires_ms must be 0 except on a TCC_TRY header"; return (int64_t)i;
        }
        if (o.kind == K_SPEC || o.kind == K_PRECONDITION) {
            *why = "SPEC/PRECONDITION record outside a group"; return (int64_t)i;
        }
        uint64_t g = o.group_size;
        if (o.kind == K_BATCH_BALANCE || o.kind == K_TCC_TRY) {
            if (g < 1 || i + g > n) { *why = "group_size runs past the end of the batch"; return (int64_t)i; }
            for (uint64_t j = i + 1; j < i + g; j++) {
                const OpRec& m = ops[j];
                bool ok_kind = m.kind == K_SPEC || (m.kind == K_PRECONDITION && o.kind == K_BATCH_BALANCE);
                if (!ok_kind) { *why = "group member of the wrong kind"; return (int64_t)j; }
                if (m.reserved != 0) { *why = "reserved bytes must be zero"; return (int64_t)j; }
                if (m.expires_ms != 0) { *why = "expires_ms must be 0 on a group member"; return (int64_t)j; }
                if (m.issued_ms != 0 && m.issued_ms != o.issued_ms) {
                    *why = "group member's issued_ms is neither 0 nor its header's"; return (int64_t)j;
                }
                if (memcmp(m.dedup_id, o.dedup_id, 16) != 0) {
                    *why = "group member's dedup_id differs from its header's"; return (int64_t)j;
                }
            }
        } else {
            if (g != 1) { *why = "group_size must be 1 for a single-record operation"; return (int64_t)i; }
        }
        i += g;
    }
    return -1;
}

class Core {
  public:
    // ---- account storage ----
    // The records live in one mapping reserved for accounts_max of them (virtual, backed by memory only as
    // accounts are created), so it never moves or grows. The id -> index table is NSEG independent
    // open-addressing tables chosen by the id hash's top bits, each doubled on its own when half full: a
    // growth rehashes 1/256 of the accounts (~4K at 1M accounts, tens of microseconds), where doubling one
    // table (and copying the records) stalled apply for hundreds of milliseconds on every replica at once.
    MappedArray<Account> accs;
    Account* acc = nullptr;
    uint32_t acc_count = 0, acc_capacity = 0;
    struct Seg { uint64_t* slots = nullptr; uint64_t mask = 0; uint64_t used = 0; };
    static const int SEG_SHIFT = 56;
    static const uint64_t NSEG = 256, SEG_SLOTS_MIN = 16;
    Seg segs[NSEG];

    // ---- everything else ----
    uint64_t last_seq = 0;
    uint64_t dedup_retention, event_retention;
    // Exactly-once past the window: a command that is not in the window and was issued (its issued_ms)
    // before `horizon` is refused with DEDUP_EXPIRED, never applied: every command evicted from the window
    // was issued before the horizon, so a late retry of it (the same record, the same issued_ms) is refused
    // however late it comes. The horizon only moves forward, at evictions, deterministically.
    uint64_t horizon = 0;
    uint64_t last_ts = 0;                // newest entry timestamp applied: the ledger's time never goes back
    // A running hash of every command's result and every event record, in order: equal on two ledgers that
    // applied the same commands, kept up to date in O(1) per command (the STATUS digest; the full
    // serialization hash, digest(), is O(state)).
    uint64_t chain_a = 0, chain_b = 0;
    uint32_t open_items_max = OPEN_ITEMS_MAX_DEFAULT;
    std::unordered_map<uint32_t, Wide> pin_sum;   // account index -> sum of its pending_in (open tries)
    // dedup table: a FIFO ring of entries (oldest evicted past dedup_retention), found through an index
    // of buckets, one cache line each, chosen by the id's hash. Word 0 of a bucket counts its ids that
    // live in the side map (they arrived while the bucket's slots were all live); words 1..7 are slots:
    // (tag << 48) | (absolute ring position mod 2^48), tag = 16 hash bits with the low bit set (0 = empty).
    // Expiry is lazy: evicting only advances dhead, and a slot whose position has left [dhead, dtotal) is
    // free for reuse. So an eviction touches no random memory, and a lookup and its insert share one line.
    struct DedupEntry { u128 id; Dedup d; };
    MappedArray<DedupEntry> dring;       // dedup_retention entries
    uint64_t dhead = 0, dtotal = 0;      // absolute positions: oldest live, next to write
    static const uint64_t DSLOTS = 7, POS_MASK = (1ULL << 48) - 1;
    MappedArray<uint64_t> dtab;          // (dbmask + 1) buckets of 8 words
    uint64_t dbmask = 0;
    std::unordered_map<u128, uint64_t, H128> dside;   // id -> absolute position, for overflowed buckets
    std::unordered_map<u128, std::vector<Spec>, H128> batch_deltas; // BATCH_BALANCE applied OK: inverse
    std::map<IdxKey, i128> reservations;                           // (account index, reservation_id)
    std::map<IdxKey, Pending> pending;                             // (account index, txn_id)
    std::unordered_map<u128, Txn, H128> txns;
    std::deque<Finished> finished_txns;                            // confirmed/cancelled, for eviction
    // TCC expiry: the TRIED txns that have an expires_ms, by (due_ms, txn_id): the ones to cancel at an entry
    // time ts are a prefix (nothing due: one comparison). expiry_ts / expiry_records: the entry time whose
    // EXPIRY_RECORDS_PER_TS_MAX budget is being spent, and how much of it is spent.
    std::set<DueKey> expiry;
    uint64_t expiry_ts = 0, expiry_records = 0;
    uint64_t seq_before_commands = 0;    // last_seq once the latest apply() had expired what was due

    // events: a ring of event_retention records
    MappedArray<EvRec> ev;
    uint64_t ev_total = 0;              // records ever written
    MappedArray<uint64_t> seq_pos;      // ring: seq -> absolute position of its first record
    // ring: seq -> dedup_hash of its first record's dedup_id (the command's; 0's for an expiry): what the event
    // store's dedup index needs of each seq, derived output like the events, written as each seq is finished
    // (so the store does not re-read the 128-byte records for it); rebuilt from the events on restore.
    MappedArray<uint64_t> seq_hash;
    uint64_t seq_first_live = 1;        // lowest seq whose records are all still in the ring

    // Both retentions must be powers of two (ring indexing is a mask); the wrapper rounds them up.
    Core(uint64_t dedup_retention_, uint64_t event_retention_, uint32_t accounts_max, uint64_t initial_capacity)
        : dedup_retention(dedup_retention_), event_retention(event_retention_) {
        accs.allocate(accounts_max, true);
        acc = accs.p; acc_capacity = accounts_max;
        {   // room for every table at its largest (load >= 1/4) plus the sizes it grew through, twice over
            uint64_t words = 64;
            while (words < 2 * (uint64_t)accounts_max) words <<= 1;
            slot_pool.allocate(4 * words + NSEG * 64 + 4 * std::max<uint64_t>(initial_capacity, 1) + 4096, true);
        }
        seg_init(initial_capacity);
        ev.allocate(event_retention, false);
        seq_pos.allocate(event_retention, false);
        seq_hash.allocate(event_retention, false);
        dring.allocate(dedup_retention, false);
        uint64_t nb = 64;
        while (nb * 2 < dedup_retention) nb <<= 1;    // at most 2 live entries per bucket on average
        dtab.allocate(nb * 8, true);
        dbmask = nb - 1;
    }

    ~Core() = default;
    Core(const Core&) = delete;
    Core& operator=(const Core&) = delete;

    // ------------------------------------------------------------------------------- account index
    // A slot is (high 32 bits of the id's hash) << 32 | (account index + 1); 0 is empty. The tag lets a
    // probe skip colliding slots without touching their (cold) account records.
    const Seg& seg_of(uint64_t h) const { return segs[h >> SEG_SHIFT]; }
    int64_t find(u128 id) const {
        uint64_t h = hmix(id), tag = h >> 32;
        const Seg& g = seg_of(h);
        for (uint64_t i = h & g.mask;; i = (i + 1) & g.mask) {
            uint64_t s = g.slots[i];
            if (s == 0) return -1;
            if ((s >> 32) == tag && acc[(uint32_t)s - 1].id == id) return (int64_t)((uint32_t)s - 1);
        }
    }
    static void seg_put(Seg& g, uint64_t h, uint32_t idx) {
        uint64_t i = h & g.mask;
        while (g.slots[i] != 0) i = (i + 1) & g.mask;
        g.slots[i] = ((h >> 32) << 32) | ((uint64_t)idx + 1);
        g.used++;
    }
    // Every table lives in one mapping on transparent huge pages (a lookup is a random access: on 4K pages
    // it costs a TLB miss), carved by a bump pointer; a table given up on growth goes to a free list of its
    // size and is reused by the next table that grows to it (the tables grow through the same sizes).
    MappedArray<uint64_t> slot_pool;
    uint64_t pool_top = 0;
    std::vector<uint64_t*> pool_free[64];
    static int log2_of(uint64_t n) { return 63 - __builtin_clzll(n); }
    void seg_alloc(Seg& g, uint64_t nslots) {
        std::vector<uint64_t*>& fl = pool_free[log2_of(nslots)];
        uint64_t* p;
        if (!fl.empty()) { p = fl.back(); fl.pop_back(); }
        else {
            if (pool_top + nslots > slot_pool.size()) throw std::bad_alloc();
            p = slot_pool.p + pool_top; pool_top += nslots;
        }
        memset(p, 0, nslots * sizeof(uint64_t));
        g.slots = p; g.mask = nslots - 1; g.used = 0;
    }
    void seg_release(Seg& g) {
        if (g.slots) pool_free[log2_of(g.mask + 1)].push_back(g.slots);
        g.slots = nullptr;
    }
    void seg_grow(Seg& g) {
        Seg old = g;
        seg_alloc(g, (old.mask + 1) * 2);
        for (uint64_t i = 0; i <= old.mask; i++) {
            uint64_t s = old.slots[i];
            if (s) seg_put(g, hmix(acc[(uint32_t)s - 1].id), (uint32_t)s - 1);
        }
        seg_release(old);
    }
    void slot_insert(uint32_t idx) {
        uint64_t h = hmix(acc[idx].id);
        Seg& g = segs[h >> SEG_SHIFT];
        if ((g.used + 1) * 2 > g.mask + 1) seg_grow(g);    // load factor at most 1/2
        seg_put(g, h, idx);
    }
    void seg_free() {
        for (auto& g : segs) g.slots = nullptr;
        for (auto& fl : pool_free) fl.clear();
        pool_top = 0;
    }
    // Size every table for `accounts` ids (a hint: they grow on their own).
    void seg_init(uint64_t accounts) {
        seg_free();
        uint64_t per = SEG_SLOTS_MIN;
        while (per < 2 * (accounts / NSEG + 1) + 8) per <<= 1;
        for (auto& g : segs) seg_alloc(g, per);
    }
    void rehash() {
        seg_init(acc_count);
        for (uint32_t k = 0; k < acc_count; k++) slot_insert(k);
    }
    uint64_t index_bytes() const {
        return pool_top * sizeof(uint64_t);       // the part of the pool ever used (live + reusable)
    }

    // ------------------------------------------------------------------------------- chain digest
    // One step of the two lanes. The lanes are serial chains (each step waits for the previous one), so the
    // hot path folds in registers (ev_end) rather than through the members, which the compiler must store and
    // reload around every record read (a char pointer may alias them).
    static inline void fold_into(uint64_t& ca, uint64_t& cb, uint64_t a, uint64_t b) {
        ca = (ca ^ a) * 0x9E3779B97F4A7C15ULL; ca ^= ca >> 29;
        cb = (cb + b) * 0xD6E8FEB86659FD93ULL; cb ^= cb >> 32;
    }
    void fold(uint64_t a, uint64_t b) { fold_into(chain_a, chain_b, a, b); }

    // ------------------------------------------------------------------------------------ events
    uint64_t cur_seq = 0;               // seq of the event being written
    EvRec* ev_slot() {
        EvRec* r = &ev[ev_total & (ev.size() - 1)];
        ev_total++;
        return r;
    }
    uint64_t ev_begin_pos = 0;
    void ev_begin(uint64_t seq) {
        cur_seq = seq;
        ev_begin_pos = ev_total;
        seq_pos[seq & (seq_pos.size() - 1)] = ev_total;
    }
    // The 8 bytes at offset 112 of an event record: kind, state, part, parts, code (EvRec's layout). ev_add
    // writes them as one store and ev_end adds part and parts to them in a register: a record word built
    // from several smaller stores cannot be forwarded from the store buffer to the fold's load, which then
    // waits for the stores to retire (~15 cycles, on the chain digest's serial path, for every record).
    static uint64_t word112(uint8_t kind, uint8_t state, uint16_t part, uint16_t parts, uint16_t code) {
        return (uint64_t)kind | (uint64_t)state << 8 | (uint64_t)part << 16 | (uint64_t)parts << 32 |
               (uint64_t)code << 48;
    }
    void ev_end(uint64_t seq) {
        static_assert(offsetof(EvRec, kind) == 112 && offsetof(EvRec, state) == 113 && offsetof(EvRec, part) == 114 &&
                      offsetof(EvRec, parts) == 116 && offsetof(EvRec, code) == 118, "word112 layout");
        const uint64_t parts = ev_total - ev_begin_pos, mask = ev.size() - 1;
        uint64_t ca = chain_a, cb = chain_b;
        for (uint64_t p = ev_begin_pos; p < ev_total; p++) {
            unsigned char* r = (unsigned char*)&ev[p & mask];
            uint64_t w[16];
            memcpy(w, r, sizeof(EvRec));
            w[14] |= word112(0, 0, (uint16_t)(p - ev_begin_pos), (uint16_t)parts, 0);
            memcpy(r + 112, &w[14], 8);
            for (int k = 0; k < 16; k += 2) fold_into(ca, cb, w[k], w[k + 1]);
        }
        chain_a = ca; chain_b = cb;
        seq_hash[seq & (seq_hash.size() - 1)] = record_hash(ev[ev_begin_pos & mask]);
        // seqs whose first record was overwritten, or whose slot in seq_pos was reused, are gone
        uint64_t oldest_pos = ev_total > ev.size() ? ev_total - ev.size() : 0;
        while (seq_first_live <= seq &&
               (seq - seq_first_live >= seq_pos.size() || seq_pos[seq_first_live & (seq_pos.size() - 1)] < oldest_pos))
            seq_first_live++;
    }
    static uint64_t record_hash(const EvRec& r) {
        uint64_t lo, hi;
        memcpy(&lo, r.dedup_id, 8); memcpy(&hi, r.dedup_id + 8, 8);
        return dedup_hash(lo, hi);
    }
    // One event record of the seq being written (part and parts: ev_end). Every byte is written once, by
    // stores of 8 or 16 bytes (no memset first: a `rep stos` of 128 bytes was half of this function's time).
    void ev_add(uint64_t seq, uint64_t ts, const unsigned char* dedup_id, uint8_t kind, const Account* a,
                u128 other, i128 amount, uint16_t code = 0) {
        EvRec* r = ev_slot();
        r->seq_num = seq; r->timestamp = ts;
        memcpy(r->dedup_id, dedup_id, 16);
        st_u(r->other_id, other); st_i(r->amount, amount);
        uint64_t w;
        if (a) {
            st_u(r->account_id, a->id); st_i(r->available, a->available);
            r->version = a->version; memcpy(r->currency, a->currency, 8);
            w = word112(kind, a->state, 0, 0, code);
        } else {
            st_u(r->account_id, 0); st_i(r->available, 0);
            r->version = 0; memset(r->currency, 0, 8);
            w = word112(kind, 0, 0, 0, code);
        }
        memcpy((unsigned char*)r + 112, &w, 8);
        r->reserved2 = 0;
    }

    // -------------------------------------------------------------------------------- helpers
    static bool within_limits(const Account& a, i128 v) {
        if (!(a.flags & A_LOWER_UNBOUNDED) && v < a.lower) return false;
        if (!(a.flags & A_UPPER_UNBOUNDED) && v > a.upper) return false;
        return true;
    }
    uint64_t dedup_size() const { return dtotal - dhead; }
    uint64_t oldest_issued() const { return dtotal > dhead ? dentry(dhead).d.issued : 0; }
    uint64_t dedup_overflow() const { return dside.size(); }
    uint64_t dedup_bytes() const { return dring.bytes() + dtab.bytes(); }
    DedupEntry& dentry(uint64_t abs) { return dring[abs & (dring.size() - 1)]; }
    const DedupEntry& dentry(uint64_t abs) const { return dring[abs & (dring.size() - 1)]; }
    uint64_t* dbucket(uint64_t h) const { return dtab.p + ((h & dbmask) << 3); }
    static uint64_t dtag(uint64_t h) { return ((h >> 48) | 1) << 48; }
    // Is the entry at this (48-bit) position still in the window [dhead, dtotal)?
    bool dlive(uint64_t w) const { return ((dtotal - 1 - (w & POS_MASK)) & POS_MASK) < dtotal - dhead; }
    Dedup* dfind(u128 id) { return dfind_h(id, hmix(id)); }
    Dedup* dfind_h(u128 id, uint64_t h) {
        const uint64_t* b = dbucket(h);
        const uint64_t tag = dtag(h);
        for (uint64_t k = 1; k <= DSLOTS; k++) {
            uint64_t w = b[k];
            if ((w & ~POS_MASK) == tag && dlive(w)) {
                DedupEntry& e = dentry(w & POS_MASK);
                if (e.id == id) return &e.d;
            }
        }
        if (b[0]) {
            auto it = dside.find(id);
            if (it != dside.end()) return &dentry(it->second).d;
        }
        return nullptr;
    }
    // Index the entry at absolute position pos (the window must already include it).
    void dindex(u128 id, uint64_t h, uint64_t pos) {
        uint64_t* b = dbucket(h);
        DedupEntry& e = dentry(pos);
        for (uint64_t k = 1; k <= DSLOTS; k++) {
            if (b[k] == 0 || !dlive(b[k])) { b[k] = dtag(h) | (pos & POS_MASK); e.d.side = 0; return; }
        }
        dside[id] = pos; b[0]++; e.d.side = 1;
    }
    void remember(u128 id, const Dedup& d) { remember_h(id, d, hmix(id)); }
    void remember_h(u128 id, const Dedup& d, uint64_t h) {
        if (dtotal - dhead >= dedup_retention) {           // evict the oldest: its slot just expires
            DedupEntry& old = dentry(dhead);
            if (old.d.issued >= horizon) horizon = old.d.issued + 1;
            if (old.d.kind == K_BATCH_BALANCE) batch_deltas.erase(old.id);
            if (old.d.side) { dside.erase(old.id); dbucket(hmix(old.id))[0]--; }
            dhead++;
        }
        uint64_t pos = dtotal++;
        DedupEntry& e = dentry(pos);
        // field by field: `e.d = d` copies d (built by byte- and word-sized stores on the stack) with 16-byte
        // loads, which the store buffer cannot forward, so every command waited for those stores to retire
        e.id = id;
        e.d.seq = d.seq; e.d.code = d.code; e.d.kind = d.kind; e.d.flags = d.flags;
        e.d.from_idx = d.from_idx; e.d.to_idx = d.to_idx; e.d.issued = d.issued; e.d.amount = d.amount;
        dindex(id, h, pos);
    }
    // Finished txns are remembered in a FIFO window of dedup_retention. Evicting a tombstone moves the
    // dedup horizon past its time (as evicting a null compensation does): a late try of that txn was issued
    // before its cancel was applied, so it is refused with DEDUP_EXPIRED once the tombstone is gone. Without
    // this, expiries (finished txns that are no command, so take no dedup slot) could evict a tombstone while
    // the null cancel's own dedup entry, and with it the horizon, had not yet moved past the try.
    void txn_finished(u128 txn, uint64_t horizon_ms) {
        finished_txns.push_back(Finished{txn, horizon_ms});
        while (finished_txns.size() > dedup_retention) {
            const Finished& f = finished_txns.front();
            auto t = txns.find(f.id);
            assert_or_abort(t != txns.end(), "a finished txn is missing from the txns");
            if (t->second.state == TXN_NULL_CANCELLED && f.horizon_ms >= horizon) horizon = f.horizon_ms + 1;
            txns.erase(t);
            finished_txns.pop_front();
        }
    }

    // ------------------------------------------------------------------- structural validation
    // Returns -1 if the batch is well formed, else the index of the first bad record; *why says what.
    int64_t validate(const OpRec* ops, uint64_t n, const char** why) const { return validate_ops(ops, n, why); }

    // ------------------------------------------------------------------------------ apply batch
    // The batch must have passed validate() and the caller must have grown the account storage for
    // every CREATE_ACCOUNT record in it. One result record per op record.
    // Random access into 100+ MB of accounts dominates: prefetch the hash slots of the records
    // PREFETCH_FAR ahead and, once those are cached, the account records PREFETCH_NEAR ahead.
    static const uint64_t PREFETCH_FAR = 16, PREFETCH_NEAR = 8;
    void prefetch_slot(u128 id) const {
        uint64_t h = hmix(id);
        const Seg& g = seg_of(h);
        prefetch(&g.slots[h & g.mask]);
    }
    void prefetch_slots(const OpRec& o) const {
        prefetch_slot(ld_u(o.account_id));
        if (o.kind == K_TRANSFER) prefetch_slot(ld_u(o.other_id));
        prefetch(dbucket(hmix(ld_u(o.dedup_id))));
    }
    void prefetch_account(u128 id) const {
        uint64_t h = hmix(id), tag = h >> 32;
        const Seg& g = seg_of(h);
        for (uint64_t i = h & g.mask;; i = (i + 1) & g.mask) {
            uint64_t s = g.slots[i];
            if (s == 0) return;
            if ((s >> 32) == tag) {
                const char* p = (const char*)&acc[(uint32_t)s - 1];
                prefetch(p); prefetch(p + 64);
                return;
            }
        }
    }
    void prefetch_accounts(const OpRec& o) const {
        prefetch_account(ld_u(o.account_id));
        if (o.kind == K_TRANSFER) prefetch_account(ld_u(o.other_id));
    }
    // ts: the entry's time (ms; the leader's clock in a replicated shard). A ts older than one already
    // applied (a new leader whose clock is behind) is taken as the newest seen: time never goes back.
    void apply(const OpRec* ops, uint64_t n, ResRec* out, uint64_t ts) {
        if (ts < last_ts) ts = last_ts; else last_ts = ts;
        if (!expiry.empty() && expiry.begin()->first <= ts) expire_due(ts);
        seq_before_commands = last_seq;
        uint64_t i = 0;
        for (uint64_t r = 0; r < n && r < PREFETCH_FAR; r++) prefetch_slots(ops[r]);
        while (i < n) {
            const OpRec* o = &ops[i];
            if (i + PREFETCH_FAR < n) prefetch_slots(ops[i + PREFETCH_FAR]);
            if (i + PREFETCH_NEAR < n) prefetch_accounts(ops[i + PREFETCH_NEAR]);
            uint64_t g = o->group_size;
            uint64_t seq = 0;
            bool dup = false;
            uint16_t code = command(o, g, ts, &seq, &dup);
            for (uint64_t j = i; j < i + g; j++) {
                ResRec& r = out[j];
                memcpy(r.dedup_id, o->dedup_id, 16);
                r.seq_num = seq; r.code = code; r.flags = dup ? 1 : 0; r.kind = o->kind; r.reserved = 0;
            }
            i += g;
        }
    }

    uint16_t command(const OpRec* o, uint64_t g, uint64_t ts, uint64_t* seq_out, bool* dup) {
        u128 did = ld_u(o->dedup_id);
        if (did == 0) return INVALID_ID;
        const uint64_t dh = hmix(did);
        const Dedup* seen = dfind_h(did, dh);
        if (seen) {
            if (seen->flags & D_NULL_COMPENSATED) return ORIGINAL_COMPENSATED;  // refused, not a dup
            *dup = true; *seq_out = seen->seq;
            return seen->code;
        }
        // Not in the window: refuse what may have been applied before it (nothing remembered, so the
        // window is not spent on refusals).
        if (o->issued_ms < horizon) return DEDUP_EXPIRED;
        if (o->issued_ms > ts && o->issued_ms - ts > ISSUED_AHEAD_MAX_MS) return ISSUED_IN_FUTURE;
        Dedup d; memset(&d, 0, sizeof d);
        d.kind = o->kind;
        d.issued = o->issued_ms;
        uint64_t seq = last_seq + 1;
        uint16_t code;
        switch (o->kind) {
            case K_CREATE_ACCOUNT: code = create_account(o, seq, ts); break;
            case K_DELETE_ACCOUNT: case K_LOCK_ACCOUNT: case K_UNLOCK_ACCOUNT: code = set_state(o, seq, ts); break;
            case K_UPDATE_ACCOUNT_CONFIG: code = update_config(o, seq, ts); break;
            case K_TRANSFER: code = transfer(o, seq, ts, &d); break;
            case K_BATCH_BALANCE: code = batch_balance(o, g, seq, ts, did); break;
            case K_RESERVE: code = reserve(o, seq, ts); break;
            case K_RELEASE: code = release(o, seq, ts); break;
            case K_TCC_TRY: code = tcc_try(o, g, seq, ts); break;
            case K_TCC_CONFIRM: case K_TCC_CANCEL: code = tcc_finish(o, seq, ts); break;
            case K_COMPENSATE: code = compensate(o, seq, ts); break;
            default: code = INVALID_ID; break;   // unreachable after validate()
        }
        if (is_success(code)) {
            last_seq = seq;
            *seq_out = seq;
            d.seq = seq;
        }
        d.code = code;
        remember_h(did, d, dh);
        fold((uint64_t)did ^ ((uint64_t)code << 48), (uint64_t)(did >> 64) ^ seq);   // what the window now holds
        return code;
    }

    // --------------------------------------------------------------------------- account management
    uint16_t create_account(const OpRec* o, uint64_t seq, uint64_t ts) {
        u128 id = ld_u(o->account_id);
        if (id == 0) return INVALID_ID;
        if (!valid_currency(o->currency)) return INVALID_CURRENCY;
        if (find(id) >= 0) return ACCOUNT_ALREADY_EXISTS;
        bool lower_unb = (o->flags & F_LOWER_UNBOUNDED) != 0, upper_unb = (o->flags & F_UPPER_UNBOUNDED) != 0;
        i128 lower = lower_unb ? 0 : ((o->flags & F_HAS_A) ? ld_i(o->amount) : 0);
        i128 upper = upper_unb || !(o->flags & F_HAS_B) ? 0 : ld_i(o->expected_a);
        if (!(o->flags & F_HAS_B)) upper_unb = true;
        if (!lower_unb && lower > 0) return INVALID_LIMITS;          // a new account holds 0
        if (!upper_unb && upper < 0) return INVALID_LIMITS;
        if (acc_count >= acc_capacity) return ACCOUNT_CAPACITY_EXCEEDED;
        uint32_t idx = acc_count++;
        Account& a = acc[idx];
        memset(&a, 0, sizeof a);
        a.id = id; a.lower = lower; a.upper = upper;
        a.flags = (lower_unb ? A_LOWER_UNBOUNDED : 0) | (upper_unb ? A_UPPER_UNBOUNDED : 0);
        memcpy(a.currency, o->currency, 8);
        a.state = NORMAL; a.version = 1;
        slot_insert(idx);
        ev_begin(seq); ev_add(seq, ts, o->dedup_id, o->kind, &a, 0, 0); ev_end(seq);
        return OK;
    }

    uint16_t set_state(const OpRec* o, uint64_t seq, uint64_t ts) {
        int64_t k = find(ld_u(o->account_id));
        if (k < 0) return ACCOUNT_NOT_FOUND;
        Account& a = acc[k];
        uint8_t to;
        if (o->kind == K_LOCK_ACCOUNT) {
            if (a.state != NORMAL) return INVALID_STATE_TRANSITION;
            to = LOCKED;
        } else if (o->kind == K_UNLOCK_ACCOUNT) {
            if (a.state != LOCKED) return INVALID_STATE_TRANSITION;
            to = NORMAL;
        } else {
            if (a.state == DELETED) return INVALID_STATE_TRANSITION;
            if (a.available != 0 || a.open_items != 0) return BALANCE_NOT_ZERO;
            to = DELETED;
        }
        a.state = to; a.version++;
        ev_begin(seq); ev_add(seq, ts, o->dedup_id, o->kind, &a, 0, 0); ev_end(seq);
        return OK;
    }

    uint16_t update_config(const OpRec* o, uint64_t seq, uint64_t ts) {
        int64_t k = find(ld_u(o->account_id));
        if (k < 0) return ACCOUNT_NOT_FOUND;
        Account& a = acc[k];
        if (a.state == DELETED) return INVALID_ACCOUNT_STATE;
        Account n = a;
        if (o->flags & F_HAS_A) {
            if (o->flags & F_LOWER_UNBOUNDED) { n.flags |= A_LOWER_UNBOUNDED; n.lower = 0; }
            else { n.flags &= ~A_LOWER_UNBOUNDED; n.lower = ld_i(o->amount); }
        }
        if (o->flags & F_HAS_B) {
            if (o->flags & F_UPPER_UNBOUNDED) { n.flags |= A_UPPER_UNBOUNDED; n.upper = 0; }
            else { n.flags &= ~A_UPPER_UNBOUNDED; n.upper = ld_i(o->expected_a); }
        }
        if (!(n.flags & A_LOWER_UNBOUNDED) && !(n.flags & A_UPPER_UNBOUNDED) && n.lower > n.upper) return INVALID_LIMITS;
        if (!within_limits(n, n.available)) return INVALID_LIMITS;
        n.version++;
        a = n;
        ev_begin(seq); ev_add(seq, ts, o->dedup_id, o->kind, &a, 0, 0); ev_end(seq);
        return OK;
    }

    // ------------------------------------------------------------------------------------ transfer
    uint16_t transfer(const OpRec* o, uint64_t seq, uint64_t ts, Dedup* d) {
        i128 amount = ld_i(o->amount);
        if (amount <= 0) return INVALID_AMOUNT;
        u128 fid = ld_u(o->account_id), tid = ld_u(o->other_id);
        if (fid == tid) return SAME_ACCOUNT;
        int64_t fk = find(fid), tk = find(tid);
        if (fk < 0 || tk < 0) return ACCOUNT_NOT_FOUND;
        Account& f = acc[fk];
        Account& t = acc[tk];
        if (f.state != NORMAL || t.state != NORMAL) return INVALID_ACCOUNT_STATE;
        if (!valid_currency(o->currency)) return INVALID_CURRENCY;
        if (memcmp(f.currency, o->currency, 8) != 0 || memcmp(t.currency, o->currency, 8) != 0)
            return CURRENCY_MISMATCH;
        if ((o->flags & F_HAS_A) && f.available != ld_i(o->expected_a)) return PRECONDITION_FAILED;
        if ((o->flags & F_HAS_B) && t.available != ld_i(o->expected_b)) return PRECONDITION_FAILED;
        i128 nf, nt;
        if (__builtin_sub_overflow(f.available, amount, &nf) || __builtin_add_overflow(t.available, amount, &nt))
            return OVERFLOW;
        if (!within_limits(f, nf) || !within_limits(t, nt)) return BALANCE_LIMIT_EXCEEDED;
        f.available = nf; f.version++;
        t.available = nt; t.version++;
        d->from_idx = (uint32_t)fk; d->to_idx = (uint32_t)tk; d->amount = amount;
        ev_begin(seq);
        ev_add(seq, ts, o->dedup_id, K_TRANSFER, &f, tid, -amount);
        ev_add(seq, ts, o->dedup_id, K_TRANSFER, &t, fid, amount);
        ev_end(seq);
        return OK;
    }

    // Apply signed deltas to available, all or nothing: overflow and limits are checked on every
    // account's final balance before anything changes. Used by batch balance operations and compensation.
    std::vector<std::pair<uint32_t, i128>> scratch;   // (account index, running balance)
    uint16_t check_deltas(const Spec* specs, size_t n) {
        scratch.clear();
        for (size_t s = 0; s < n; s++) {
            size_t j = 0;
            while (j < scratch.size() && scratch[j].first != specs[s].idx) j++;
            if (j == scratch.size()) scratch.emplace_back(specs[s].idx, acc[specs[s].idx].available);
            if (__builtin_add_overflow(scratch[j].second, specs[s].amount, &scratch[j].second)) return OVERFLOW;
        }
        for (auto& p : scratch) if (!within_limits(acc[p.first], p.second)) return BALANCE_LIMIT_EXCEEDED;
        return OK;
    }
    void apply_deltas(const Spec* specs, size_t n, uint64_t seq, uint64_t ts, const unsigned char* dedup_id,
                      uint8_t kind, u128 other) {
        for (auto& p : scratch) acc[p.first].version++;
        ev_begin(seq);
        for (size_t s = 0; s < n; s++) {
            Account& a = acc[specs[s].idx];
            a.available += specs[s].amount;       // checked by check_deltas
            ev_add(seq, ts, dedup_id, kind, &a, other, specs[s].amount);
        }
        ev_end(seq);
    }

    std::vector<Spec> specbuf;
    uint16_t batch_balance(const OpRec* o, uint64_t g, uint64_t seq, uint64_t ts, u128 did) {
        if (g - 1 > GROUP_SPECS_MAX) return BATCH_TOO_LARGE;
        specbuf.clear();
        for (uint64_t j = 1; j < g; j++) {
            const OpRec& m = o[j];
            if (m.kind != K_SPEC) continue;
            i128 amount = ld_i(m.amount);
            if (amount == 0) return INVALID_AMOUNT;
            int64_t k = find(ld_u(m.account_id));
            if (k < 0) return ACCOUNT_NOT_FOUND;
            if (acc[k].state != NORMAL) return INVALID_ACCOUNT_STATE;
            if (!valid_currency(m.currency)) return INVALID_CURRENCY;
            if (memcmp(acc[k].currency, m.currency, 8) != 0) return CURRENCY_MISMATCH;
            specbuf.push_back(Spec{(uint32_t)k, amount});
        }
        if (specbuf.empty()) return INVALID_AMOUNT;
        for (uint64_t j = 1; j < g; j++) {
            const OpRec& m = o[j];
            if (m.kind != K_PRECONDITION) continue;
            int64_t k = find(ld_u(m.account_id));
            if (k < 0) return ACCOUNT_NOT_FOUND;
            if (acc[k].available != ld_i(m.amount)) return PRECONDITION_FAILED;
        }
        uint16_t c = check_deltas(specbuf.data(), specbuf.size());
        if (c != OK) return c;
        apply_deltas(specbuf.data(), specbuf.size(), seq, ts, o->dedup_id, K_BATCH_BALANCE, 0);
        std::vector<Spec> inverse(specbuf);
        for (auto& s : inverse) s.amount = -s.amount;
        batch_deltas[did] = std::move(inverse);
        return OK;
    }

    // ---------------------------------------------------------------------------- reserve / release
    uint16_t reserve(const OpRec* o, uint64_t seq, uint64_t ts) {
        i128 amount = ld_i(o->amount);
        u128 rid = ld_u(o->other_id);
        if (rid == 0) return INVALID_ID;
        if (amount <= 0) return INVALID_AMOUNT;
        int64_t k = find(ld_u(o->account_id));
        if (k < 0) return ACCOUNT_NOT_FOUND;
        Account& a = acc[k];
        if (a.state != NORMAL) return INVALID_ACCOUNT_STATE;
        i128 na, nr;
        auto it = reservations.find(IdxKey((uint32_t)k, rid));
        i128 cur = it == reservations.end() ? 0 : it->second;
        if (__builtin_sub_overflow(a.available, amount, &na) || __builtin_add_overflow(cur, amount, &nr)) return OVERFLOW;
        if (!within_limits(a, na)) return BALANCE_LIMIT_EXCEEDED;
        if (it == reservations.end() && a.open_items >= open_items_max) return OPEN_ITEMS_LIMIT_EXCEEDED;
        if (it == reservations.end()) { reservations.emplace(IdxKey((uint32_t)k, rid), nr); a.open_items++; }
        else it->second = nr;
        a.available = na; a.version++;
        ev_begin(seq); ev_add(seq, ts, o->dedup_id, K_RESERVE, &a, rid, amount); ev_end(seq);
        return OK;
    }

    uint16_t release(const OpRec* o, uint64_t seq, uint64_t ts) {
        bool full = (o->flags & F_FULL_RELEASE) != 0;
        i128 amount = ld_i(o->amount);
        u128 rid = ld_u(o->other_id);
        if (rid == 0) return INVALID_ID;
        if (!full && amount <= 0) return INVALID_AMOUNT;
        int64_t k = find(ld_u(o->account_id));
        if (k < 0) return ACCOUNT_NOT_FOUND;
        Account& a = acc[k];
        if (a.state != NORMAL) return INVALID_ACCOUNT_STATE;
        auto it = reservations.find(IdxKey((uint32_t)k, rid));
        if (it == reservations.end()) return RESERVATION_NOT_FOUND;
        if (full) amount = it->second;
        if (amount > it->second) return RESERVATION_INSUFFICIENT;
        i128 na;
        if (__builtin_add_overflow(a.available, amount, &na)) return OVERFLOW;
        if (!within_limits(a, na)) return BALANCE_LIMIT_EXCEEDED;
        it->second -= amount;
        if (it->second == 0) { reservations.erase(it); a.open_items--; }
        a.available = na; a.version++;
        ev_begin(seq); ev_add(seq, ts, o->dedup_id, K_RELEASE, &a, rid, amount); ev_end(seq);
        return OK;
    }

    // ------------------------------------------------------------------------------------------ TCC
    uint16_t tcc_try(const OpRec* o, uint64_t g, uint64_t seq, uint64_t ts) {
        u128 txn = ld_u(o->other_id);
        if (txn == 0) return INVALID_ID;
        if (g - 1 > GROUP_SPECS_MAX) return BATCH_TOO_LARGE;
        if (g < 2) return INVALID_AMOUNT;
        auto known = txns.find(txn);
        if (known != txns.end())    // anti-suspension: the cancel came first, this try must never apply
            return known->second.state == TXN_NULL_CANCELLED ? TXN_ALREADY_CANCELLED : TXN_ALREADY_EXISTS;
        if (o->expires_ms != 0 && o->expires_ms <= ts) return TXN_EXPIRED;
        specbuf.clear();
        for (uint64_t j = 1; j < g; j++) {
            const OpRec& m = o[j];
            i128 amount = ld_i(m.amount);
            if (amount == 0) return INVALID_AMOUNT;
            int64_t k = find(ld_u(m.account_id));
            if (k < 0) return ACCOUNT_NOT_FOUND;
            if (acc[k].state != NORMAL) return INVALID_ACCOUNT_STATE;
            if (!valid_currency(m.currency)) return INVALID_CURRENCY;
            if (memcmp(acc[k].currency, m.currency, 8) != 0) return CURRENCY_MISMATCH;
            if (amount == I128_MIN) return OVERFLOW;
            specbuf.push_back(Spec{(uint32_t)k, amount});
        }
        // per account: available after the outgoing specs (lower limit), and
        // available + all pending_in + this try's incoming (upper limit)
        scratch.clear();
        std::vector<i128> incoming, outgoing;
        for (auto& s : specbuf) {
            size_t j = 0;
            while (j < scratch.size() && scratch[j].first != s.idx) j++;
            if (j == scratch.size()) {
                scratch.emplace_back(s.idx, acc[s.idx].available); incoming.push_back(0); outgoing.push_back(0);
            }
            if (s.amount < 0) {
                if (__builtin_add_overflow(scratch[j].second, s.amount, &scratch[j].second) ||
                    __builtin_sub_overflow(outgoing[j], s.amount, &outgoing[j])) return OVERFLOW;
            } else if (__builtin_add_overflow(incoming[j], s.amount, &incoming[j])) return OVERFLOW;
        }
        for (size_t j = 0; j < scratch.size(); j++) {
            const Account& a = acc[scratch[j].first];
            if (!(a.flags & A_LOWER_UNBOUNDED) && scratch[j].second < a.lower) return BALANCE_LIMIT_EXCEEDED;
            if (a.open_items >= open_items_max) return OPEN_ITEMS_LIMIT_EXCEEDED;
            Wide top;                       // available + every pending_in + this try's incoming
            auto ps = pin_sum.find(scratch[j].first);
            if (ps != pin_sum.end()) top = ps->second;
            top.add(a.available);
            top.add(incoming[j]);
            if (top.carry != 0) return OVERFLOW;
            if (!(a.flags & A_UPPER_UNBOUNDED) && top.lo > a.upper) return BALANCE_LIMIT_EXCEEDED;
        }
        for (auto& p : scratch) acc[p.first].version++;
        Txn& t = txns[txn];
        t.state = TXN_TRIED;
        t.specs = specbuf;
        t.expires_ms = t.due_ms = o->expires_ms;
        if (t.expires_ms != 0) expiry.insert(DueKey(t.due_ms, txn));
        ev_begin(seq);
        for (auto& s : specbuf) {
            Account& a = acc[s.idx];
            auto key = IdxKey(s.idx, txn);
            auto it = pending.find(key);
            if (it == pending.end()) { it = pending.emplace(key, Pending{0, 0}).first; a.open_items++; }
            if (s.amount < 0) { a.available += s.amount; it->second.out -= s.amount; }
            else { it->second.in += s.amount; pin_sum[s.idx].add(s.amount); }
            ev_add(seq, ts, o->dedup_id, K_TCC_TRY, &a, txn, s.amount);
        }
        ev_end(seq);
        return OK;
    }

    uint16_t tcc_finish(const OpRec* o, uint64_t seq, uint64_t ts) {
        bool confirm = o->kind == K_TCC_CONFIRM;
        u128 txn = ld_u(o->other_id);
        if (txn == 0) return INVALID_ID;
        auto tit = txns.find(txn);
        if (tit == txns.end()) {
            if (confirm) return TXN_NOT_FOUND;       // a confirm never comes first
            // Null cancel: the try has not arrived (delayed or lost). Leave a tombstone, in this same step,
            // so a try that arrives later is refused and nothing stays pending forever.
            Txn& t = txns[txn];
            t.state = TXN_NULL_CANCELLED;
            txn_finished(txn, std::max(o->issued_ms, ts));
            ev_begin(seq); ev_add(seq, ts, o->dedup_id, K_TCC_CANCEL, nullptr, txn, 0, NULL_CANCELLED);
            ev_end(seq);
            return NULL_CANCELLED;
        }
        Txn& t = tit->second;
        if (t.state == TXN_CONFIRMED) return TXN_ALREADY_CONFIRMED;
        if (t.state == TXN_CANCELLED || t.state == TXN_NULL_CANCELLED) return TXN_ALREADY_CANCELLED;
        // due but not yet cancelled (the expiry budget of this entry time is spent, or its cancel was refused
        // and is retried later): it can only be cancelled now
        if (confirm && t.expires_ms != 0 && t.expires_ms <= ts) return TXN_EXPIRED;
        return finish_txn(txn, t, confirm, seq, ts, o->dedup_id, o->kind, OK);
    }

    // Confirm or cancel a TRIED txn, all or nothing: OK, or OVERFLOW / BALANCE_LIMIT_EXCEEDED and nothing
    // changed. Its events carry dedup_id, kind and ev_code (the ledger's own expiry: TXN_EXPIRED).
    uint16_t finish_txn(u128 txn, Txn& t, bool confirm, uint64_t seq, uint64_t ts, const unsigned char* dedup_id,
                        uint8_t kind, uint16_t ev_code) {
        assert_or_abort(t.state == TXN_TRIED, "finishing a txn that is not TRIED");
        // what each account gets back into available: confirm -> pending_in; cancel -> pending_out
        scratch.clear();
        for (auto& s : t.specs) {
            size_t j = 0;
            while (j < scratch.size() && scratch[j].first != s.idx) j++;
            if (j < scratch.size()) continue;
            auto pit = pending.find(IdxKey(s.idx, txn));
            assert_or_abort(pit != pending.end(), "a TRIED txn's account has no pending entry for it");
            const Pending& p = pit->second;
            i128 back = confirm ? p.in : p.out, na;
            if (__builtin_add_overflow(acc[s.idx].available, back, &na)) return OVERFLOW;
            if (back > 0 && !(acc[s.idx].flags & A_UPPER_UNBOUNDED) && na > acc[s.idx].upper)
                return BALANCE_LIMIT_EXCEEDED;
            scratch.emplace_back(s.idx, na);
        }
        ev_begin(seq);
        for (auto& p : scratch) {
            Account& a = acc[p.first];
            a.available = p.second; a.version++;
            auto pit = pending.find(IdxKey(p.first, txn));
            if (pit->second.in != 0) pin_sub(p.first, pit->second.in);
            pending.erase(pit);
            assert_or_abort(a.open_items > 0, "open_items would go below zero");
            a.open_items--;
        }
        for (auto& s : t.specs) {  // amount: the spec as tried (confirm) or its reversal (cancel)
            ev_add(seq, ts, dedup_id, kind, &acc[s.idx], txn, confirm ? s.amount : -s.amount, ev_code);
        }
        ev_end(seq);
        if (t.expires_ms != 0) {
            size_t erased = expiry.erase(DueKey(t.due_ms, txn));
            assert_or_abort(erased == 1, "a TRIED txn with expires_ms is missing from the expiry index");
        }
        t.state = confirm ? TXN_CONFIRMED : TXN_CANCELLED;
        std::vector<Spec>().swap(t.specs);
        txn_finished(txn, 0);
        return OK;
    }

    // Cancel, as a tcc_cancel would, every TRIED txn due at ts, in (due_ms, txn_id) order, before the commands
    // of an apply call: a pure function of the state and ts. Each is one seq; its events have kind TCC_CANCEL,
    // code TXN_EXPIRED and dedup_id 0 (no command did it; 0 is never a command's dedup id, so RESULT_OF of the
    // try's dedup id keeps answering the try). At most EXPIRY_RECORDS_PER_TS_MAX records per entry time;
    // a cancel that is refused is tried again EXPIRY_RETRY_MS later.
    void expire_due(uint64_t ts) {
        static const unsigned char no_command[16] = {0};
        if (ts != expiry_ts) { expiry_ts = ts; expiry_records = 0; }
        while (!expiry.empty() && expiry.begin()->first <= ts) {
            const DueKey key = *expiry.begin();
            auto tit = txns.find(key.second);
            assert_or_abort(tit != txns.end(), "the expiry index holds an unknown txn");
            Txn& t = tit->second;
            assert_or_abort(t.state == TXN_TRIED && t.due_ms == key.first && t.expires_ms != 0 &&
                            t.expires_ms <= t.due_ms, "the expiry index disagrees with its txn");
            if (expiry_records + t.specs.size() > EXPIRY_RECORDS_PER_TS_MAX) break;
            expiry_records += t.specs.size();
            const uint64_t seq = last_seq + 1;
            if (finish_txn(key.second, t, false, seq, ts, no_command, K_TCC_CANCEL, TXN_EXPIRED) == OK) {
                last_seq = seq;
            } else {                              // the money moved on: try again later
                expiry.erase(expiry.begin());
                t.due_ms = ts + EXPIRY_RETRY_MS;
                expiry.insert(DueKey(t.due_ms, key.second));
            }
        }
        assert_or_abort(expiry.empty() || expiry.begin()->first > ts ||
                        expiry_records + txns.at(expiry.begin()->second).specs.size() > EXPIRY_RECORDS_PER_TS_MAX,
                        "a due txn was left although the expiry budget allowed it");
    }

    // O(state) check of the TCC and open-item bookkeeping, for tests: nullptr, or what is wrong.
    const char* check_invariants() const {
        std::unordered_map<uint32_t, Wide> pin;
        std::vector<uint32_t> items(acc_count, 0);
        for (auto& r : reservations) items[r.first.first]++;
        for (auto& p : pending) {
            items[p.first.first]++;
            if (p.second.in != 0) pin[p.first.first].add(p.second.in);
            auto t = txns.find(p.first.second);
            if (t == txns.end() || t->second.state != TXN_TRIED) return "a pending entry of a txn that is not TRIED";
        }
        for (uint32_t k = 0; k < acc_count; k++) if (items[k] != acc[k].open_items) return "open_items is not the count of reservations + pending entries";
        if (pin.size() != pin_sum.size()) return "pending_in sums: an account missing or extra";
        for (auto& ps : pin_sum) {
            auto it = pin.find(ps.first);
            if (it == pin.end() || it->second.lo != ps.second.lo || it->second.carry != ps.second.carry)
                return "pending_in sum differs from the sum of the account's pending_in";
        }
        size_t with_expiry = 0, tried = 0;
        for (auto& t : txns) {
            tried += t.second.state == TXN_TRIED;
            if (t.second.state != TXN_TRIED) { if (!t.second.specs.empty()) return "a finished txn keeps specs"; continue; }
            if (t.second.specs.empty()) return "a TRIED txn without specs";
            if (t.second.expires_ms == 0) continue;
            with_expiry++;
            if (!expiry.count(DueKey(t.second.due_ms, t.first))) return "a TRIED txn with expires_ms is not in the expiry index";
        }
        if (with_expiry != expiry.size()) return "the expiry index holds entries that are no TRIED txn";
        if (tried + finished_txns.size() != txns.size()) return "a txn neither TRIED nor in the finished window";
        for (auto& f : finished_txns) {
            auto t = txns.find(f.id);
            if (t == txns.end() || t->second.state == TXN_TRIED) return "a finished txn missing or TRIED";
            if (f.horizon_ms != 0 && t->second.state != TXN_NULL_CANCELLED)
                return "a finished txn that is no tombstone carries a horizon time";
        }
        return nullptr;
    }

    void pin_sub(uint32_t idx, i128 in) {
        auto it = pin_sum.find(idx);
        assert_or_abort(it != pin_sum.end(), "pending_in sum missing for an account with pending_in");
        it->second.add(-in);
        if (it->second.lo == 0 && it->second.carry == 0) pin_sum.erase(it);
    }
    static void assert_or_abort(bool ok, const char* what) {
        if (!ok) { fprintf(stderr, "zwallet ledger invariant broken: %s\n", what); abort(); }
    }

    // ---------------------------------------------------------------------------------- compensate
    uint16_t compensate(const OpRec* o, uint64_t seq, uint64_t ts) {
        u128 orig = ld_u(o->other_id);
        if (orig == 0 || orig == ld_u(o->dedup_id)) return INVALID_ID;
        Dedup* found = dfind(orig);
        if (!found) {
            // never seen: remember it so the original is refused if it arrives later
            Dedup m; memset(&m, 0, sizeof m);
            m.kind = K_COMPENSATE; m.code = ORIGINAL_COMPENSATED; m.flags = D_NULL_COMPENSATED; m.seq = seq;
            // once this is evicted the original must still be refused: it was issued before now
            m.issued = std::max(o->issued_ms, ts);
            remember(orig, m);
            ev_begin(seq); ev_add(seq, ts, o->dedup_id, K_COMPENSATE, nullptr, orig, 0, NULL_COMPENSATED);
            ev_end(seq);
            return NULL_COMPENSATED;
        }
        Dedup& d = *found;
        if (d.flags & (D_COMPENSATED | D_NULL_COMPENSATED)) return ORIGINAL_COMPENSATED;
        if (d.code != OK) {                       // the original changed nothing: nothing to undo
            d.flags |= D_COMPENSATED;
            ev_begin(seq); ev_add(seq, ts, o->dedup_id, K_COMPENSATE, nullptr, orig, 0); ev_end(seq);
            return OK;
        }
        Spec inv[2];
        const Spec* specs;
        size_t n;
        if (d.kind == K_TRANSFER) {
            inv[0] = Spec{d.from_idx, d.amount};
            inv[1] = Spec{d.to_idx, -d.amount};
            specs = inv; n = 2;
        } else if (d.kind == K_BATCH_BALANCE) {
            auto bit = batch_deltas.find(orig);
            if (bit == batch_deltas.end()) return NOT_COMPENSATABLE;   // unreachable: evicted together
            specs = bit->second.data(); n = bit->second.size();
        } else {
            return NOT_COMPENSATABLE;
        }
        for (size_t s = 0; s < n; s++) if (acc[specs[s].idx].state == DELETED) return INVALID_ACCOUNT_STATE;
        uint16_t c = check_deltas(specs, n);
        if (c != OK) return c;
        apply_deltas(specs, n, seq, ts, o->dedup_id, K_COMPENSATE, orig);
        d.flags |= D_COMPENSATED;
        batch_deltas.erase(orig);
        return OK;
    }

    // ----------------------------------------------------------------------------- inspection
    bool events_range(uint64_t first, uint64_t last, uint64_t* pos_first, uint64_t* pos_end) const {
        if (first < seq_first_live || last > last_seq || first > last || first == 0) return false;
        *pos_first = seq_pos[first & (seq_pos.size() - 1)];
        *pos_end = last == last_seq ? ev_total : seq_pos[(last + 1) & (seq_pos.size() - 1)];
        return true;
    }
    const EvRec& event_at(uint64_t pos) const { return ev[pos & (ev.size() - 1)]; }

    // Byte-level views for the Python wrapper (it never sees __int128).
    struct AccountView {
        unsigned char id[16], available[16], lower[16], upper[16], reserved[16], pending_in[16], pending_out[16];
        int64_t reserved_carry, pending_in_carry, pending_out_carry;   // sums wider than 128 bits
        uint64_t version; char currency[9]; uint8_t state, flags; uint32_t open_items;
    };
    struct KV { unsigned char key[16], a[16], b[16]; };
    bool view(const unsigned char* id, AccountView* v) const {
        int64_t k = find(ld_u(id));
        if (k < 0) return false;
        const Account& a = acc[k];
        memset(v, 0, sizeof *v);
        st_u(v->id, a.id); st_i(v->available, a.available); st_i(v->lower, a.lower); st_i(v->upper, a.upper);
        Wide rs, pin, pout;
        for (auto it = reservations.lower_bound(IdxKey((uint32_t)k, 0)); it != reservations.end() && it->first.first == (uint32_t)k; ++it)
            rs.add(it->second);
        for (auto it = pending.lower_bound(IdxKey((uint32_t)k, 0)); it != pending.end() && it->first.first == (uint32_t)k; ++it) {
            pin.add(it->second.in); pout.add(it->second.out);
        }
        st_i(v->reserved, rs.lo); st_i(v->pending_in, pin.lo); st_i(v->pending_out, pout.lo);
        v->reserved_carry = rs.carry; v->pending_in_carry = pin.carry; v->pending_out_carry = pout.carry;
        v->version = a.version; memcpy(v->currency, a.currency, 8); v->state = a.state; v->flags = a.flags;
        v->open_items = a.open_items;
        return true;
    }
    void reservations_of(const unsigned char* id, std::vector<KV>& out) const {
        out.clear();
        int64_t k = find(ld_u(id));
        if (k < 0) return;
        for (auto it = reservations.lower_bound(IdxKey((uint32_t)k, 0)); it != reservations.end() && it->first.first == (uint32_t)k; ++it) {
            KV kv; st_u(kv.key, it->first.second); st_i(kv.a, it->second); st_i(kv.b, 0); out.push_back(kv);
        }
    }
    void pending_of(const unsigned char* id, std::vector<KV>& out) const {
        out.clear();
        int64_t k = find(ld_u(id));
        if (k < 0) return;
        for (auto it = pending.lower_bound(IdxKey((uint32_t)k, 0)); it != pending.end() && it->first.first == (uint32_t)k; ++it) {
            KV kv; st_u(kv.key, it->first.second); st_i(kv.a, it->second.in); st_i(kv.b, it->second.out); out.push_back(kv);
        }
    }
    // Sums over the accounts of one currency: available, reserved, pending_in, pending_out, each as
    // (low 128 bits, carry) because a sum of i128 balances need not fit in 128 bits.
    void totals(const char* currency8, unsigned char* lo4x16, int64_t* carry4) const {
        Wide w[4];
        for (uint32_t k = 0; k < acc_count; k++) if (memcmp(acc[k].currency, currency8, 8) == 0) w[0].add(acc[k].available);
        for (auto& r : reservations) if (memcmp(acc[r.first.first].currency, currency8, 8) == 0) w[1].add(r.second);
        for (auto& p : pending) if (memcmp(acc[p.first.first].currency, currency8, 8) == 0) { w[2].add(p.second.in); w[3].add(p.second.out); }
        for (int i = 0; i < 4; i++) { st_i(lo4x16 + 16 * i, w[i].lo); carry4[i] = w[i].carry; }
    }
    uint64_t event_count(uint64_t first, uint64_t last) const {
        uint64_t a, b;
        if (!events_range(first, last, &a, &b)) return UINT64_MAX;
        return b - a;
    }
    void copy_events(uint64_t first, uint64_t last, EvRec* out) const {
        uint64_t a, b;
        if (!events_range(first, last, &a, &b)) return;
        const uint64_t mask = ev.size() - 1, start = a & mask, n = b - a;
        const uint64_t head = std::min<uint64_t>(n, ev.size() - start);   // up to the ring's end, then from 0
        memcpy(out, &ev[start], head * sizeof(EvRec));
        if (n > head) memcpy(out + head, &ev[0], (n - head) * sizeof(EvRec));
    }
    // The seq_hash of seqs first..last (an events_range that holds), one u64 each; *ts_first / *ts_last: the
    // timestamps of the range's first and last records (events' timestamps never decrease: their min and max).
    void copy_seq_hashes(uint64_t first, uint64_t last, uint64_t* out, uint64_t* ts_first, uint64_t* ts_last) const {
        uint64_t a, b;
        if (!events_range(first, last, &a, &b) || b == a) return;
        const uint64_t mask = seq_hash.size() - 1;
        for (uint64_t s = first; s <= last; s++) *out++ = seq_hash[s & mask];
        *ts_first = ev[a & (ev.size() - 1)].timestamp;
        *ts_last = ev[(b - 1) & (ev.size() - 1)].timestamp;
    }
    int64_t find_bytes(const unsigned char* id) const { return find(ld_u(id)); }

    // ------------------------------------------------------------------------ snapshot / restore
    // A canonical byte serialization of the whole state (independent of hash-table capacity and of
    // unordered containers' iteration order), used by snapshot() and digest().
    template <class T> static void put(std::string& s, const T& v) { s.append((const char*)&v, sizeof(T)); }
    std::string serialize() const {
        std::string s;
        put(s, (uint64_t)3);  // format version (1: no issued times, horizon, clock or chain; 2: no TCC expiry
                              // or tombstone times)
        put(s, dedup_retention); put(s, event_retention); put(s, last_seq);
        put(s, (uint64_t)acc_count);
        s.append((const char*)acc, (size_t)acc_count * sizeof(Account));
        put(s, dedup_size());
        for (uint64_t a = dhead; a < dtotal; a++) {
            const u128 id = dentry(a).id;
            const Dedup& d = dentry(a).d;
            put(s, id); put(s, d.seq); put(s, d.code); put(s, d.kind); put(s, d.flags);
            put(s, d.from_idx); put(s, d.to_idx); put(s, d.amount); put(s, d.issued);
            auto b = batch_deltas.find(id);
            uint64_t nb = b == batch_deltas.end() ? 0 : b->second.size();
            put(s, nb);
            for (uint64_t k = 0; k < nb; k++) { put(s, b->second[k].idx); put(s, b->second[k].amount); }
        }
        put(s, (uint64_t)reservations.size());
        for (auto& r : reservations) { put(s, r.first.first); put(s, r.first.second); put(s, r.second); }
        put(s, (uint64_t)pending.size());
        for (auto& p : pending) { put(s, p.first.first); put(s, p.first.second); put(s, p.second); }
        std::vector<u128> open;
        for (auto& t : txns) if (t.second.state == TXN_TRIED) open.push_back(t.first);
        std::sort(open.begin(), open.end());
        put(s, (uint64_t)open.size());
        for (const u128& id : open) {
            const Txn& t = txns.at(id);
            put(s, id); put(s, t.expires_ms); put(s, t.due_ms); put(s, (uint64_t)t.specs.size());
            for (auto& sp : t.specs) { put(s, sp.idx); put(s, sp.amount); }
        }
        put(s, (uint64_t)finished_txns.size());
        for (const Finished& f : finished_txns) { put(s, f.id); put(s, txns.at(f.id).state); put(s, f.horizon_ms); }
        // events still retained
        put(s, seq_first_live);
        uint64_t pos0 = seq_first_live <= last_seq ? seq_pos[seq_first_live & (seq_pos.size() - 1)] : ev_total;
        put(s, ev_total - pos0);
        for (uint64_t p = pos0; p < ev_total; p++) put(s, ev[p & (ev.size() - 1)]);
        put(s, horizon); put(s, last_ts); put(s, chain_a); put(s, chain_b);
        put(s, expiry_ts); put(s, expiry_records);
        return s;
    }

    template <class T> static bool get(const char*& p, const char* end, T* v) {
        if ((size_t)(end - p) < sizeof(T)) return false;
        memcpy(v, p, sizeof(T)); p += sizeof(T); return true;
    }
    // Restores everything but the account array, which the caller sizes first (peek_account_count)
    // and whose pointer it sets before calling. Returns an error message or nullptr.
    static bool peek_account_count(const char* p, const char* end, uint64_t* n) {
        p += 32;
        return get(p, end, n);
    }
    const char* deserialize(const char* p, const char* end) {
        uint64_t ver, n;
        if (!get(p, end, &ver) || ver < 1 || ver > 3) return "unknown snapshot format version";
        if (!get(p, end, &dedup_retention) || !get(p, end, &event_retention) || !get(p, end, &last_seq)) return "truncated header";
        if (dedup_retention != dring.size() || event_retention != ev.size())
            return "retention is not the one this ledger was made with (or not a power of two)";
        if (!get(p, end, &n) || n > acc_capacity) return "bad account count";
        if ((size_t)(end - p) < n * sizeof(Account)) return "truncated accounts";
        memcpy(acc, p, n * sizeof(Account)); p += n * sizeof(Account); acc_count = (uint32_t)n;
        rehash();
        if (!get(p, end, &n)) return "truncated dedup";
        for (uint64_t k = 0; k < n; k++) {
            u128 id; Dedup d; uint64_t nb;
            memset(&d, 0, sizeof d);
            if (!get(p, end, &id) || !get(p, end, &d.seq) || !get(p, end, &d.code) || !get(p, end, &d.kind) ||
                !get(p, end, &d.flags) || !get(p, end, &d.from_idx) || !get(p, end, &d.to_idx) ||
                !get(p, end, &d.amount) || (ver >= 2 && !get(p, end, &d.issued)) || !get(p, end, &nb))
                return "truncated dedup entry";
            if (nb > GROUP_SPECS_MAX) return "bad batch deltas";
            if (d.from_idx >= acc_count && d.kind == K_TRANSFER && d.code == OK) return "bad dedup entry";
            if (nb) {
                std::vector<Spec> v(nb);
                for (auto& sp : v) if (!get(p, end, &sp.idx) || !get(p, end, &sp.amount) || sp.idx >= acc_count) return "bad batch deltas";
                batch_deltas[id] = std::move(v);
            }
            if (dfind(id)) return "duplicate dedup id";
            if (dedup_size() >= dedup_retention) return "more dedup entries than the retention";
            remember(id, d);
        }
        if (!get(p, end, &n)) return "truncated reservations";
        for (uint64_t k = 0; k < n; k++) {
            uint32_t idx; u128 rid; i128 amt;
            if (!get(p, end, &idx) || !get(p, end, &rid) || !get(p, end, &amt) || idx >= acc_count) return "bad reservation";
            reservations[IdxKey(idx, rid)] = amt;
        }
        if (!get(p, end, &n)) return "truncated pending";
        for (uint64_t k = 0; k < n; k++) {
            uint32_t idx; u128 txn; Pending pd;
            if (!get(p, end, &idx) || !get(p, end, &txn) || !get(p, end, &pd) || idx >= acc_count) return "bad pending entry";
            pending[IdxKey(idx, txn)] = pd;
        }
        if (!get(p, end, &n)) return "truncated txns";
        for (uint64_t k = 0; k < n; k++) {
            u128 id; uint64_t ns, expires = 0, due = 0;
            if (!get(p, end, &id) || (ver >= 3 && (!get(p, end, &expires) || !get(p, end, &due))) ||
                !get(p, end, &ns) || ns == 0 || ns > GROUP_SPECS_MAX) return "bad txn";
            if (txns.count(id) || (expires == 0) != (due == 0) || due < expires) return "bad txn";
            Txn& t = txns[id]; t.state = TXN_TRIED; t.specs.resize(ns);
            t.expires_ms = expires; t.due_ms = due;
            if (expires != 0) expiry.insert(DueKey(due, id));
            for (auto& sp : t.specs) if (!get(p, end, &sp.idx) || !get(p, end, &sp.amount) || sp.idx >= acc_count) return "bad txn spec";
        }
        if (!get(p, end, &n)) return "truncated finished txns";
        for (uint64_t k = 0; k < n; k++) {
            u128 id; uint8_t st; uint64_t hz = 0;
            if (!get(p, end, &id) || !get(p, end, &st) || (ver >= 3 && !get(p, end, &hz))) return "bad finished txn";
            if (txns.count(id) || st < TXN_CONFIRMED || st > (ver >= 3 ? TXN_NULL_CANCELLED : TXN_CANCELLED) ||
                (hz != 0 && st != TXN_NULL_CANCELLED)) return "bad finished txn";
            txns[id].state = st; finished_txns.push_back(Finished{id, hz});
        }
        uint64_t nev;
        if (!get(p, end, &seq_first_live) || !get(p, end, &nev)) return "truncated events";
        const size_t tail = ver >= 3 ? 6 * sizeof(uint64_t) : ver >= 2 ? 4 * sizeof(uint64_t) : 0;
        if ((size_t)(end - p) != nev * sizeof(EvRec) + tail) return "bad event section size";
        if (nev > event_retention) return "more events than the retention";
        const uint64_t cap = event_retention;
        ev_total = nev;
        uint64_t prev = 0;
        for (uint64_t k = 0; k < nev; k++) {
            memcpy(&ev[k], p, sizeof(EvRec)); p += sizeof(EvRec);
            if (ev[k].seq_num != prev) {
                seq_pos[ev[k].seq_num & (cap - 1)] = k; seq_hash[ev[k].seq_num & (cap - 1)] = record_hash(ev[k]);
                prev = ev[k].seq_num;
            }
        }
        if (ver >= 2 && (!get(p, end, &horizon) || !get(p, end, &last_ts) || !get(p, end, &chain_a) ||
                         !get(p, end, &chain_b))) return "truncated clock section";
        if (ver >= 3 && (!get(p, end, &expiry_ts) || !get(p, end, &expiry_records))) return "truncated expiry section";
        seq_before_commands = last_seq;
        for (auto& pd : pending) if (pd.second.in != 0) pin_sum[pd.first.first].add(pd.second.in);
        return nullptr;
    }
};

}  // namespace zw
