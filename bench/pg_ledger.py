"""The baseline most teams build instead of zwallet: balances in PostgreSQL, updated in transactions with
row locks, with the same durability (fsync on, synchronous_commit on).

    python3 -m bench.pg_ledger --smoke     # start a private PostgreSQL, print the baseline's order of magnitude

It takes the same op records as zwallet (``engine.records.OP_DTYPE``) and returns the same result records
(``RESULT_DTYPE``) with the same result codes, checked in the same order (docs/ledger.md), so one command
stream can be run against both and the results compared. It is written the way a competent team would:

- The ledger logic is in plpgsql functions, one round trip per request: ``zw_apply`` takes a whole batch as
  arrays (one array per op-record field, built with numpy and sent in PostgreSQL's binary array format),
  ``zw_transfer`` takes one transfer. A request is one statement in autocommit mode: one transaction, one
  commit, one WAL flush (concurrent commits share flushes: PostgreSQL's own group commit).
- ``zw_apply`` locks every account the batch names with one ``SELECT ... ORDER BY id FOR UPDATE`` (account
  id order: concurrent batches never deadlock on accounts), loads them into plpgsql arrays, applies the
  commands in order in memory (each sees the effect of the previous ones, as in zwallet), then writes each
  changed account once (``UPDATE ... FROM unnest(...)``), the new accounts once, and one row per command
  into ``dedup``. Reservations and TCC rows are written as the commands go (they are rarer).
- ``zw_transfer`` locks its two accounts in id order, checks, updates both, records the command.
- Exactly-once: every command's dedup id, kind, code and seq (and its accounts and amount: a journal) is
  a row of ``dedup``; a duplicate returns the original code and seq with the DUPLICATE flag; rejections
  are remembered too. Two concurrent requests with the same dedup id: the second's insert fails (unique
  violation), its whole transaction is rolled back and retried, and then finds the first's row.
- Retries: unique violations, deadlocks and serialization failures roll the whole request back; the client
  retries it (``RETRIES_MAX`` times), as any correct client of such a schema must.

API: ``PgLedger(dsn)`` with ``create_schema()``, ``load_accounts(ids, currency, lower_limit=0|None,
initial_available=0, upper_limit=None)`` (binary COPY), ``apply_batch(conn, ops)`` and ``apply_one(conn,
ops)`` (RESULT_DTYPE out), ``balances(ids)``, ``get_account(id)``, ``totals(currency)``, ``total(currency)``,
``dedup_count()``, ``connect()``; module-level ``connect(dsn)``/``connect_async(dsn)``,
``apply_one_async(aconn, ops)``, ``encode_batch(ops)``, and the load drivers ``run_batched(dsn, batches,
connections)`` (threads) and ``run_unbatched(dsn, transfers, connections=64, processes=2, rate=None)``
(processes running asyncio; closed loop or a fixed offered rate).

Semantic differences from zwallet (all documented, none on the benchmark's paths):
- 64-bit, not 128-bit: ids are bigint (< 2**63; 0 is "none" as in zwallet), amounts and balances bigint.
  A record whose ids or amounts do not fit raises ValueError before anything is sent. OVERFLOW is returned
  where a bigint would overflow (zwallet: where an i128 would). A TCC try's upper-limit check sums
  available + pending_in + incoming in numeric (exact), and only for accounts with an upper limit.
- Kinds covered: CREATE_ACCOUNT, TRANSFER (with expected balances), BATCH_BALANCE (specs and
  preconditions), RESERVE, RELEASE (full or partial), TCC_TRY, TCC_CONFIRM, TCC_CANCEL. Not covered (a
  batch holding one raises NotImplementedError): DELETE/LOCK/UNLOCK_ACCOUNT, UPDATE_ACCOUNT_CONFIG,
  COMPENSATE (so no NULL_COMPENSATED/ORIGINAL_COMPENSATED). Accounts have a ``state`` column (always
  NORMAL here) and the INVALID_ACCOUNT_STATE checks are made, so adding lock/unlock would change no path.
- The dedup table and finished TCC transactions are kept forever (zwallet: a FIFO window of
  ``dedup_retention`` ids).
- ``seq_num``: a value of the sequence ``zw_seq``, unique and increasing within a request, but neither
  gap-free nor in commit order across concurrent requests: a gap-free number would need one counter row
  that every transaction updates, serializing them all. There is no event stream (zwallet writes one event
  record per account touched); the ``dedup`` journal row per command is the baseline's history. Both
  choices favour the baseline.
- TCC confirm/cancel visit a transaction's accounts in the table's order, not the try's spec order: the
  code differs only if one account would overflow and another exceed its limit at once.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import psycopg
from psycopg import errors as pgerr
from psycopg.adapt import Dumper
from psycopg.pq import Format

from bench import loadgen
from engine import records as R
from engine._ledger import check_batch

K = R.Kind
RETRIES_MAX = 20
_I64_MAX = (1 << 63) - 1
SUPPORTED_KINDS = frozenset({K.CREATE_ACCOUNT, K.TRANSFER, K.BATCH_BALANCE, K.RESERVE, K.RELEASE, K.TCC_TRY,
                             K.TCC_CONFIRM, K.TCC_CANCEL, K.SPEC, K.PRECONDITION})
_RETRYABLE = (pgerr.SerializationFailure, pgerr.DeadlockDetected, pgerr.UniqueViolation)
_T = TypeVar("_T")

# ------------------------------------------------------------------------------------------- schema
SCHEMA_SQL = r"""
DROP TABLE IF EXISTS accounts, dedup, reservations, tcc_txns, tcc_pending CASCADE;
DROP SEQUENCE IF EXISTS zw_seq;
CREATE TABLE accounts (
    id          bigint PRIMARY KEY,
    currency    text     NOT NULL,
    state       smallint NOT NULL DEFAULT 0,      -- 0 NORMAL (lock/unlock/delete are not implemented)
    available   bigint   NOT NULL DEFAULT 0,
    lower_limit bigint,                           -- NULL: unbounded
    upper_limit bigint,                           -- NULL: unbounded
    version     bigint   NOT NULL DEFAULT 1
) WITH (fillfactor = 70);                         -- room for HOT updates: balances change, keys never
CREATE TABLE dedup (                              -- exactly-once, and the journal of commands
    dedup_id    bigint PRIMARY KEY,
    kind        smallint NOT NULL,
    code        smallint NOT NULL,
    seq         bigint   NOT NULL,                -- 0: rejected
    account_id  bigint,
    other_id    bigint,
    amount      bigint
);
CREATE TABLE reservations (
    account_id     bigint NOT NULL,
    reservation_id bigint NOT NULL,
    amount         bigint NOT NULL,
    PRIMARY KEY (account_id, reservation_id)
);
CREATE TABLE tcc_txns (
    txn_id bigint PRIMARY KEY,
    state  smallint NOT NULL                      -- 1 tried, 2 confirmed, 3 cancelled, 4 null-cancelled
);
CREATE TABLE tcc_pending (
    account_id  bigint NOT NULL,
    txn_id      bigint NOT NULL,
    pending_in  bigint NOT NULL,
    pending_out bigint NOT NULL,
    PRIMARY KEY (account_id, txn_id)
);
CREATE INDEX tcc_pending_txn ON tcc_pending (txn_id);
CREATE SEQUENCE zw_seq;
"""

FUNCTIONS_SQL = r"""
-- Position of account id x in ids: binary search of ids[1..nsorted] (sorted), then a scan of the rest.
CREATE OR REPLACE FUNCTION zw_pos(ids bigint[], nsorted int, x bigint) RETURNS int
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE lo int := 1; hi int := nsorted; mid int; v bigint;
BEGIN
    WHILE lo <= hi LOOP
        mid := (lo + hi) / 2; v := ids[mid];
        IF v = x THEN RETURN mid; ELSIF v < x THEN lo := mid + 1; ELSE hi := mid - 1; END IF;
    END LOOP;
    FOR k IN nsorted + 1 .. coalesce(array_length(ids, 1), 0) LOOP
        IF ids[k] = x THEN RETURN k; END IF;
    END LOOP;
    RETURN 0;
END $$;

-- One batch of commands in one transaction. c_*: one element per command (its header record); m_*: the
-- group members, command i owning m[c_m0[i] .. c_m0[i] + c_mn[i] - 1]. Positions (c_pa, c_pb, m_p) index
-- uids (sorted distinct account ids named by the batch; 0: id 0). c_first[i]: the first command of the
-- batch with the same dedup id. curs[c_curi[i]]: the currency (NULL: not a valid asset code).
-- fin_txns: txn ids of the confirms/cancels (their accounts are locked too).
CREATE OR REPLACE FUNCTION zw_apply(
    c_did bigint[], c_kind int[], c_flags int[], c_a bigint[], c_b bigint[], c_amt bigint[],
    c_ea bigint[], c_eb bigint[], c_curi int[], c_first int[], c_pa int[], c_pb int[], c_m0 int[], c_mn int[],
    m_kind int[], m_p int[], m_amt bigint[], m_curi int[], curs text[], uids bigint[], fin_txns bigint[],
    OUT r_code int[], OUT r_dup bool[], OUT r_seq bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    MAXB CONSTANT bigint := 9223372036854775807;
    MINB CONSTANT bigint := -9223372036854775808;
    n int := coalesce(array_length(c_did, 1), 0);
    nsorted int := coalesce(array_length(uids, 1), 0);
    nu int;
    ids bigint[]; f_ids bigint[];
    a_ex bool[]; a_cur text[]; a_st int[]; a_av bigint[]; a_lo bigint[]; a_hi bigint[]; a_ver bigint[];
    a_dirty bool[]; a_new bool[]; any_new bool := false;
    a_tmp bigint[]; a_inc bigint[]; a_out bigint[];     -- per-group scratch, back to NULL after each group
    touched int[]; ps int[]; backs bigint[];
    keep bool[];
    old_code int[]; old_seq bigint[]; any_old bool := false;
    i int; j int; g int; p int; pb int; f int; fl int; k int; code int;
    amt bigint; x bigint; y bigint; lo bigint; hi bigint; rid bigint; txn bigint; res bigint;
    nspec int; st int; conf bool; top numeric; cur text; rec record;
BEGIN
    r_code := array_fill(0, ARRAY[n]);
    r_dup := array_fill(false, ARRAY[n]);
    r_seq := array_fill(0::bigint, ARRAY[n]);
    keep := array_fill(false, ARRAY[n]);
    ids := uids;
    IF coalesce(array_length(fin_txns, 1), 0) > 0 THEN   -- accounts of transactions tried in earlier requests
        ids := ids || ARRAY(SELECT DISTINCT t.account_id FROM tcc_pending t
                            WHERE t.txn_id = ANY(fin_txns) AND t.account_id <> ALL(uids) ORDER BY 1);
    END IF;
    nu := coalesce(array_length(ids, 1), 0);

    -- lock every account in id order (one statement), load them into arrays aligned with ids
    SELECT array_agg(l.id), array_agg(l.currency), array_agg(l.state::int), array_agg(l.available),
           array_agg(l.lower_limit), array_agg(l.upper_limit), array_agg(l.version)
      INTO f_ids, a_cur, a_st, a_av, a_lo, a_hi, a_ver
      FROM (SELECT a.id, a.currency, a.state, a.available, a.lower_limit, a.upper_limit, a.version
              FROM accounts a WHERE a.id = ANY(ids) ORDER BY a.id FOR UPDATE) l;
    IF coalesce(array_length(f_ids, 1), 0) = nu AND nu = nsorted THEN
        a_ex := array_fill(true, ARRAY[nu]);          -- all exist and ids is sorted: already aligned
    ELSE                                              -- some missing (or extras): align (rows are locked)
        SELECT array_agg(s.ex), array_agg(s.currency), array_agg(s.state), array_agg(s.available),
               array_agg(s.lower_limit), array_agg(s.upper_limit), array_agg(s.version)
          INTO a_ex, a_cur, a_st, a_av, a_lo, a_hi, a_ver
          FROM (SELECT a.id IS NOT NULL AS ex, a.currency, coalesce(a.state, 0)::int AS state,
                       coalesce(a.available, 0) AS available, a.lower_limit, a.upper_limit,
                       coalesce(a.version, 0) AS version
                  FROM unnest(ids) WITH ORDINALITY u(id, o) LEFT JOIN accounts a ON a.id = u.id ORDER BY u.o) s;
    END IF;
    IF nu = 0 THEN
        a_ex := '{}'; a_cur := '{}'; a_st := '{}'; a_av := '{}'; a_lo := '{}'; a_hi := '{}'; a_ver := '{}';
    END IF;
    a_dirty := array_fill(false, ARRAY[nu]);
    a_new := array_fill(false, ARRAY[nu]);
    a_tmp := array_fill(NULL::bigint, ARRAY[nu]);
    a_inc := a_tmp; a_out := a_tmp;

    -- commands seen before (after the locks: a concurrent request on the same accounts has committed)
    IF EXISTS (SELECT 1 FROM dedup d WHERE d.dedup_id = ANY(c_did)) THEN
        any_old := true;
        SELECT array_agg(s.code), array_agg(s.seq) INTO old_code, old_seq
          FROM (SELECT d.code::int AS code, d.seq FROM unnest(c_did) WITH ORDINALITY o(id, o)
                LEFT JOIN LATERAL (SELECT x.code, x.seq FROM dedup x WHERE x.dedup_id = o.id) d ON true
                ORDER BY o.o) s;
    END IF;

    FOR i IN 1 .. n LOOP
        IF c_did[i] = 0 THEN r_code[i] := 24; CONTINUE; END IF;                 -- INVALID_ID, not remembered
        f := c_first[i];
        IF f <> i THEN                                                          -- a duplicate within the batch
            r_code[i] := r_code[f]; r_dup[i] := true; r_seq[i] := r_seq[f]; CONTINUE;
        END IF;
        IF any_old AND old_code[i] IS NOT NULL THEN                             -- a duplicate of an earlier request
            r_code[i] := old_code[i]; r_dup[i] := true; r_seq[i] := old_seq[i]; CONTINUE;
        END IF;
        keep[i] := true;
        k := c_kind[i]; fl := c_flags[i]; code := 0;

        IF k = 6 THEN                                                           -- TRANSFER
            amt := c_amt[i]; p := c_pa[i]; pb := c_pb[i]; cur := curs[c_curi[i]];
            IF amt <= 0 THEN code := 6;
            ELSIF c_a[i] = c_b[i] THEN code := 17;
            ELSIF p = 0 OR pb = 0 OR NOT a_ex[p] OR NOT a_ex[pb] THEN code := 1;
            ELSIF a_st[p] <> 0 OR a_st[pb] <> 0 THEN code := 3;
            ELSIF cur IS NULL OR a_cur[p] <> cur OR a_cur[pb] <> cur THEN code := 5;
            ELSIF ((fl & 1) <> 0 AND a_av[p] <> c_ea[i]) OR ((fl & 2) <> 0 AND a_av[pb] <> c_eb[i]) THEN code := 7;
            ELSIF a_av[p] < MINB + amt OR a_av[pb] > MAXB - amt THEN code := 16;
            ELSE
                x := a_av[p] - amt; y := a_av[pb] + amt;
                IF x < a_lo[p] OR x > a_hi[p] OR y < a_lo[pb] OR y > a_hi[pb] THEN code := 4;
                ELSE
                    a_av[p] := x; a_ver[p] := a_ver[p] + 1; a_dirty[p] := true;
                    a_av[pb] := y; a_ver[pb] := a_ver[pb] + 1; a_dirty[pb] := true;
                END IF;
            END IF;

        ELSIF k = 1 THEN                                                        -- CREATE_ACCOUNT
            p := c_pa[i]; cur := curs[c_curi[i]];
            IF c_a[i] = 0 THEN code := 24;
            ELSIF cur IS NULL THEN code := 23;
            ELSIF a_ex[p] THEN code := 2;
            ELSE
                lo := CASE WHEN (fl & 4) <> 0 THEN NULL WHEN (fl & 1) <> 0 THEN c_amt[i] ELSE 0 END;
                hi := CASE WHEN (fl & 8) <> 0 OR (fl & 2) = 0 THEN NULL ELSE c_ea[i] END;
                IF lo > 0 OR hi < 0 THEN code := 22;
                ELSE
                    a_ex[p] := true; a_new[p] := true; any_new := true; a_dirty[p] := true;
                    a_cur[p] := cur; a_st[p] := 0; a_av[p] := 0; a_lo[p] := lo; a_hi[p] := hi; a_ver[p] := 1;
                END IF;
            END IF;

        ELSIF k = 7 THEN                                                        -- BATCH_BALANCE
            g := c_mn[i];
            IF g > 1024 THEN code := 19;
            ELSE
                nspec := 0;
                FOR j IN c_m0[i] .. c_m0[i] + g - 1 LOOP
                    CONTINUE WHEN m_kind[j] <> 14;
                    p := m_p[j];
                    IF m_amt[j] = 0 THEN code := 6; EXIT; END IF;
                    IF p = 0 OR NOT a_ex[p] THEN code := 1; EXIT; END IF;
                    IF a_st[p] <> 0 THEN code := 3; EXIT; END IF;
                    cur := curs[m_curi[j]];
                    IF cur IS NULL OR a_cur[p] <> cur THEN code := 5; EXIT; END IF;
                    nspec := nspec + 1;
                END LOOP;
                IF code = 0 AND nspec = 0 THEN code := 6; END IF;
                IF code = 0 THEN
                    FOR j IN c_m0[i] .. c_m0[i] + g - 1 LOOP
                        CONTINUE WHEN m_kind[j] <> 15;
                        p := m_p[j];
                        IF p = 0 OR NOT a_ex[p] THEN code := 1; EXIT; END IF;
                        IF a_av[p] <> m_amt[j] THEN code := 7; EXIT; END IF;
                    END LOOP;
                END IF;
                IF code = 0 THEN
                    touched := '{}';
                    FOR j IN c_m0[i] .. c_m0[i] + g - 1 LOOP
                        CONTINUE WHEN m_kind[j] <> 14;
                        p := m_p[j]; amt := m_amt[j];
                        IF a_tmp[p] IS NULL THEN a_tmp[p] := a_av[p]; touched := touched || p; END IF;
                        x := a_tmp[p];
                        IF (amt > 0 AND x > MAXB - amt) OR (amt < 0 AND x < MINB - amt) THEN code := 16; EXIT; END IF;
                        a_tmp[p] := x + amt;
                    END LOOP;
                    IF code = 0 THEN
                        FOREACH p IN ARRAY touched LOOP
                            x := a_tmp[p];
                            IF x < a_lo[p] OR x > a_hi[p] THEN code := 4; EXIT; END IF;
                        END LOOP;
                    END IF;
                    FOREACH p IN ARRAY touched LOOP
                        IF code = 0 THEN
                            a_av[p] := a_tmp[p]; a_ver[p] := a_ver[p] + 1; a_dirty[p] := true;
                        END IF;
                        a_tmp[p] := NULL;
                    END LOOP;
                END IF;
            END IF;

        ELSIF k = 8 THEN                                                        -- RESERVE
            rid := c_b[i]; amt := c_amt[i]; p := c_pa[i];
            IF rid = 0 THEN code := 24;
            ELSIF amt <= 0 THEN code := 6;
            ELSIF p = 0 OR NOT a_ex[p] THEN code := 1;
            ELSIF a_st[p] <> 0 THEN code := 3;
            ELSE
                SELECT r.amount INTO res FROM reservations r WHERE r.account_id = ids[p] AND r.reservation_id = rid;
                x := a_av[p];
                IF x < MINB + amt OR coalesce(res, 0) > MAXB - amt THEN code := 16;
                ELSIF x - amt < a_lo[p] OR x - amt > a_hi[p] THEN code := 4;
                ELSE
                    IF res IS NULL THEN
                        INSERT INTO reservations (account_id, reservation_id, amount) VALUES (ids[p], rid, amt);
                    ELSE
                        UPDATE reservations SET amount = res + amt WHERE account_id = ids[p] AND reservation_id = rid;
                    END IF;
                    a_av[p] := x - amt; a_ver[p] := a_ver[p] + 1; a_dirty[p] := true;
                END IF;
            END IF;

        ELSIF k = 9 THEN                                                        -- RELEASE
            rid := c_b[i]; amt := c_amt[i]; p := c_pa[i];
            IF rid = 0 THEN code := 24;
            ELSIF (fl & 16) = 0 AND amt <= 0 THEN code := 6;
            ELSIF p = 0 OR NOT a_ex[p] THEN code := 1;
            ELSIF a_st[p] <> 0 THEN code := 3;
            ELSE
                SELECT r.amount INTO res FROM reservations r WHERE r.account_id = ids[p] AND r.reservation_id = rid;
                IF res IS NULL THEN code := 8;
                ELSE
                    IF (fl & 16) <> 0 THEN amt := res; END IF;
                    x := a_av[p];
                    IF amt > res THEN code := 9;
                    ELSIF x > MAXB - amt THEN code := 16;
                    ELSIF x + amt < a_lo[p] OR x + amt > a_hi[p] THEN code := 4;
                    ELSE
                        IF amt = res THEN
                            DELETE FROM reservations WHERE account_id = ids[p] AND reservation_id = rid;
                        ELSE
                            UPDATE reservations SET amount = res - amt
                             WHERE account_id = ids[p] AND reservation_id = rid;
                        END IF;
                        a_av[p] := x + amt; a_ver[p] := a_ver[p] + 1; a_dirty[p] := true;
                    END IF;
                END IF;
            END IF;

        ELSIF k = 10 THEN                                                       -- TCC_TRY
            txn := c_b[i]; g := c_mn[i];
            IF txn = 0 THEN code := 24;
            ELSIF g > 1024 THEN code := 19;
            ELSIF g < 1 THEN code := 6;
            ELSIF EXISTS (SELECT 1 FROM tcc_txns t WHERE t.txn_id = txn) THEN   -- 4: a null cancel's tombstone
                code := CASE WHEN (SELECT t.state FROM tcc_txns t WHERE t.txn_id = txn) = 4 THEN 13 ELSE 11 END;
            ELSE
                FOR j IN c_m0[i] .. c_m0[i] + g - 1 LOOP
                    p := m_p[j]; amt := m_amt[j];
                    IF amt = 0 THEN code := 6; EXIT; END IF;
                    IF p = 0 OR NOT a_ex[p] THEN code := 1; EXIT; END IF;
                    IF a_st[p] <> 0 THEN code := 3; EXIT; END IF;
                    cur := curs[m_curi[j]];
                    IF cur IS NULL OR a_cur[p] <> cur THEN code := 5; EXIT; END IF;
                    IF amt = MINB THEN code := 16; EXIT; END IF;
                END LOOP;
                IF code = 0 THEN
                    touched := '{}';
                    -- per account: available after the outgoing specs, incoming and outgoing totals
                    FOR j IN c_m0[i] .. c_m0[i] + g - 1 LOOP
                        p := m_p[j]; amt := m_amt[j];
                        IF a_tmp[p] IS NULL THEN
                            a_tmp[p] := a_av[p]; a_inc[p] := 0; a_out[p] := 0; touched := touched || p;
                        END IF;
                        IF amt < 0 THEN
                            IF a_tmp[p] < MINB - amt OR a_out[p] > MAXB + amt THEN code := 16; EXIT; END IF;
                            a_tmp[p] := a_tmp[p] + amt; a_out[p] := a_out[p] - amt;
                        ELSE
                            IF a_inc[p] > MAXB - amt THEN code := 16; EXIT; END IF;
                            a_inc[p] := a_inc[p] + amt;
                        END IF;
                    END LOOP;
                    IF code = 0 THEN
                        FOREACH p IN ARRAY touched LOOP
                            IF a_tmp[p] < a_lo[p] THEN code := 4; EXIT; END IF;
                            IF a_hi[p] IS NOT NULL THEN     -- available + every pending_in + this try's incoming
                                SELECT a_av[p]::numeric + coalesce(sum(t.pending_in), 0) + a_inc[p] INTO top
                                  FROM tcc_pending t WHERE t.account_id = ids[p];
                                IF top > a_hi[p] THEN code := 4; EXIT; END IF;
                            END IF;
                        END LOOP;
                    END IF;
                    IF code = 0 THEN
                        INSERT INTO tcc_txns (txn_id, state) VALUES (txn, 1);
                        FOREACH p IN ARRAY touched LOOP
                            INSERT INTO tcc_pending (account_id, txn_id, pending_in, pending_out)
                                VALUES (ids[p], txn, a_inc[p], a_out[p]);
                            a_av[p] := a_tmp[p]; a_ver[p] := a_ver[p] + 1; a_dirty[p] := true;
                        END LOOP;
                    END IF;
                    FOREACH p IN ARRAY touched LOOP
                        a_tmp[p] := NULL; a_inc[p] := NULL; a_out[p] := NULL;
                    END LOOP;
                END IF;
            END IF;

        ELSIF k = 11 OR k = 12 THEN                                             -- TCC_CONFIRM / TCC_CANCEL
            txn := c_b[i]; conf := k = 11;
            IF txn = 0 THEN code := 24;
            ELSE
                SELECT t.state INTO st FROM tcc_txns t WHERE t.txn_id = txn;
                IF NOT FOUND AND conf THEN code := 10;
                ELSIF NOT FOUND THEN               -- null cancel: a tombstone, so a late try is refused
                    INSERT INTO tcc_txns (txn_id, state) VALUES (txn, 4);
                    code := 29;
                ELSIF st = 2 THEN code := 12;
                ELSIF st = 3 OR st = 4 THEN code := 13;
                ELSE
                    ps := '{}'; backs := '{}';
                    FOR rec IN SELECT t.account_id, t.pending_in, t.pending_out FROM tcc_pending t
                               WHERE t.txn_id = txn LOOP
                        p := zw_pos(ids, nsorted, rec.account_id);
                        IF p = 0 THEN   -- tried by a request that committed after this one looked: retry
                            RAISE EXCEPTION USING ERRCODE = '40001',
                                MESSAGE = 'zw_apply: accounts of txn ' || txn || ' were not locked; retry';
                        END IF;
                        x := CASE WHEN conf THEN rec.pending_in ELSE rec.pending_out END;
                        IF a_av[p] > MAXB - x THEN code := 16; EXIT; END IF;
                        IF x > 0 AND a_av[p] + x > a_hi[p] THEN code := 4; EXIT; END IF;
                        ps := ps || p; backs := backs || x;
                    END LOOP;
                    IF code = 0 THEN
                        FOR j IN 1 .. coalesce(array_length(ps, 1), 0) LOOP
                            p := ps[j];
                            a_av[p] := a_av[p] + backs[j]; a_ver[p] := a_ver[p] + 1; a_dirty[p] := true;
                        END LOOP;
                        DELETE FROM tcc_pending WHERE txn_id = txn;
                        UPDATE tcc_txns SET state = CASE WHEN conf THEN 2 ELSE 3 END WHERE txn_id = txn;
                    END IF;
                END IF;
            END IF;

        ELSE
            RAISE EXCEPTION 'zw_apply: kind % is not implemented by the PostgreSQL baseline', k;
        END IF;

        r_code[i] := code;
        IF code = 0 OR code = 29 THEN r_seq[i] := nextval('zw_seq'); END IF;   -- 29: NULL_CANCELLED, a success
    END LOOP;

    -- write back: new accounts, changed accounts (each once), one journal row per new command
    IF any_new THEN
        INSERT INTO accounts (id, currency, state, available, lower_limit, upper_limit, version)
            SELECT t.id, t.cur, t.st, t.av, t.lo, t.hi, t.ver
              FROM unnest(ids, a_cur, a_st, a_av, a_lo, a_hi, a_ver, a_new) AS t(id, cur, st, av, lo, hi, ver, nw)
             WHERE t.nw;
    END IF;
    UPDATE accounts a SET available = t.av, version = t.ver
      FROM unnest(ids, a_av, a_ver, a_dirty, a_new) AS t(id, av, ver, d, nw)
     WHERE t.d AND NOT t.nw AND a.id = t.id;
    INSERT INTO dedup (dedup_id, kind, code, seq, account_id, other_id, amount)
        SELECT t.d, t.k, t.c, t.s, t.a, t.b, t.m
          FROM unnest(c_did, c_kind, r_code, r_seq, c_a, c_b, c_amt, keep) AS t(d, k, c, s, a, b, m, kp)
         WHERE t.kp;
END $$;

-- One transfer in its own transaction (the unbatched path): the same checks, in the same order.
CREATE OR REPLACE FUNCTION zw_transfer(p_did bigint, p_from bigint, p_to bigint, p_amt bigint, p_cur text,
                                       p_flags int, p_ea bigint, p_eb bigint,
                                       OUT r_code int, OUT r_dup bool, OUT r_seq bigint)
LANGUAGE plpgsql AS $$
DECLARE
    MAXB CONSTANT bigint := 9223372036854775807;
    MINB CONSTANT bigint := -9223372036854775808;
    f accounts%ROWTYPE; t accounts%ROWTYPE; nf bigint; nt bigint;
BEGIN
    r_dup := false; r_seq := 0;
    IF p_did = 0 THEN r_code := 24; RETURN; END IF;
    SELECT d.code, d.seq INTO r_code, r_seq FROM dedup d WHERE d.dedup_id = p_did;
    IF FOUND THEN r_dup := true; RETURN; END IF;
    r_code := 0; r_seq := 0;
    IF p_amt <= 0 THEN r_code := 6;
    ELSIF p_from = p_to THEN r_code := 17;
    ELSE
        IF p_from < p_to THEN                                      -- lock in account id order
            SELECT * INTO f FROM accounts WHERE id = p_from FOR UPDATE;
            SELECT * INTO t FROM accounts WHERE id = p_to FOR UPDATE;
        ELSE
            SELECT * INTO t FROM accounts WHERE id = p_to FOR UPDATE;
            SELECT * INTO f FROM accounts WHERE id = p_from FOR UPDATE;
        END IF;
        IF f.id IS NULL OR t.id IS NULL THEN r_code := 1;
        ELSIF f.state <> 0 OR t.state <> 0 THEN r_code := 3;
        ELSIF p_cur IS NULL OR f.currency <> p_cur OR t.currency <> p_cur THEN r_code := 5;
        ELSIF ((p_flags & 1) <> 0 AND f.available <> p_ea) OR ((p_flags & 2) <> 0 AND t.available <> p_eb) THEN
            r_code := 7;
        ELSIF f.available < MINB + p_amt OR t.available > MAXB - p_amt THEN r_code := 16;
        ELSE
            nf := f.available - p_amt; nt := t.available + p_amt;
            IF nf < f.lower_limit OR nf > f.upper_limit OR nt < t.lower_limit OR nt > t.upper_limit THEN
                r_code := 4;
            ELSE
                UPDATE accounts SET available = nf, version = version + 1 WHERE id = p_from;
                UPDATE accounts SET available = nt, version = version + 1 WHERE id = p_to;
                r_seq := nextval('zw_seq');
            END IF;
        END IF;
    END IF;
    INSERT INTO dedup (dedup_id, kind, code, seq, account_id, other_id, amount)
        VALUES (p_did, 6, r_code, r_seq, p_from, p_to, p_amt);
END $$;
"""

APPLY_SQL = ("SELECT r_code, r_dup, r_seq FROM zw_apply(%b::bigint[], %b::int[], %b::int[], %b::bigint[], "
             "%b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], %b::int[], %b::int[], %b::int[], %b::int[], "
             "%b::int[], %b::int[], %b::int[], %b::int[], %b::bigint[], %b::int[], %b::text[], %b::bigint[], "
             "%b::bigint[])")
TRANSFER_SQL = ("SELECT r_code, r_dup, r_seq FROM zw_transfer(%b::bigint, %b::bigint, %b::bigint, %b::bigint, "
                "%b::text, %b::int, %b::bigint, %b::bigint)")


# ----------------------------------------------------------------------------- numpy <-> PostgreSQL
class _NumpyArrayDumper(Dumper):
    """1-D numpy int64/int32/bool arrays in PostgreSQL's binary array format (no per-element Python)."""
    format = Format.BINARY
    _ELEM = {np.dtype(np.int64): (20, 1016, ">i8"), np.dtype(np.int32): (23, 1007, ">i4"),
             np.dtype(np.bool_): (16, 1000, "u1")}

    def get_key(self, obj: Any, format: Any) -> Any:
        return (self.cls, obj.dtype.str)

    def upgrade(self, obj: Any, format: Any) -> Dumper:
        if obj.dtype not in self._ELEM:
            raise TypeError(f"numpy arrays of {obj.dtype} are not sent to PostgreSQL: int64, int32 or bool only")
        d = _NumpyArrayDumper(self.cls)
        d.connection = self.connection
        d.oid = self._ELEM[obj.dtype][1]
        return d

    def dump(self, obj: Any) -> bytes:
        elem_oid, _, be = self._ELEM[obj.dtype]
        a = np.ascontiguousarray(obj).reshape(-1)
        n = a.shape[0]
        if n == 0:
            return struct.pack("!iiI", 0, 0, elem_oid)
        size = np.dtype(be).itemsize
        body = np.empty(n, dtype=[("len", ">i4"), ("v", be)])
        body["len"] = size
        body["v"] = a
        return struct.pack("!iiIii", 1, 0, elem_oid, n, 1) + body.tobytes()


def configure(conn: psycopg.Connection | psycopg.AsyncConnection) -> None:
    conn.adapters.register_dumper(np.ndarray, _NumpyArrayDumper)


def connect(dsn: str) -> psycopg.Connection:
    """An autocommit connection (one statement = one transaction = one round trip), prepared statements."""
    conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=0)
    configure(conn)
    return conn


async def connect_async(dsn: str) -> psycopg.AsyncConnection:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
    configure(conn)
    return conn


def _u64(field: np.ndarray, what: str) -> np.ndarray:
    lo, hi = field[:, 0], field[:, 1]
    if hi.any() or (lo > _I64_MAX).any():
        raise ValueError(f"{what} >= 2**63: the PostgreSQL baseline stores ids as bigint")
    return lo.astype(np.int64)


def _i64(field: np.ndarray, what: str) -> np.ndarray:
    lo = field[:, 0].view(np.int64)
    ext = np.where(lo < 0, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0))
    if (field[:, 1] != ext).any():
        raise ValueError(f"{what} outside the 64-bit range: the PostgreSQL baseline stores amounts as bigint")
    return lo.astype(np.int64)


def _currency_text(raw: bytes) -> str | None:
    """The asset code as text, or None when zwallet would call it invalid (1..8 printable ASCII)."""
    if not 1 <= len(raw) <= R.CURRENCY_SIZE_MAX or not all(0x21 <= b <= 0x7E for b in raw):
        return None
    return raw.decode("ascii")


class _Encoded:
    __slots__ = ("params", "gsize", "hdr_dedup", "hdr_kind", "n")
    params: tuple[Any, ...]          # zw_apply's arguments, in order
    gsize: np.ndarray                # records per command (a group's members follow its header)
    hdr_dedup: np.ndarray            # the command headers' dedup_id and kind fields
    hdr_kind: np.ndarray
    n: int                           # records in the batch


def encode_batch(ops: np.ndarray) -> _Encoded:
    """Op records -> the arguments of ``zw_apply`` (numpy arrays, a short currency list)."""
    check_batch(ops)
    kinds = ops["kind"]
    bad = np.setdiff1d(np.unique(kinds), np.array(sorted(SUPPORTED_KINDS), dtype=np.uint8))
    if bad.size:
        raise NotImplementedError(f"kinds {[K(int(k)).name for k in bad]} are not implemented by the "
                                  "PostgreSQL baseline")
    member = (kinds == K.SPEC) | (kinds == K.PRECONDITION)
    h = ops[~member]
    m = ops[member]
    nh = len(h)
    kind = h["kind"].astype(np.int32)
    did = _u64(h["dedup_id"], "dedup_id")
    a = _u64(h["account_id"], "account_id")
    b = _u64(h["other_id"], "other_id")
    amt = _i64(h["amount"], "amount")
    ea = _i64(h["expected_a"], "expected_a")
    eb = _i64(h["expected_b"], "expected_b")
    gsize = h["group_size"].astype(np.int64)
    mn = (gsize - 1).astype(np.int32)
    m0 = (np.cumsum(mn, dtype=np.int64) - mn + 1).astype(np.int32)
    m_acct = _u64(m["account_id"], "account_id")
    m_amt = _i64(m["amount"], "amount")

    ucur, cinv = np.unique(np.concatenate([h["currency"], m["currency"]]), return_inverse=True)
    curs = [_currency_text(bytes(c)) for c in ucur]
    cinv = (cinv.reshape(-1) + 1).astype(np.int32)

    uses_a = np.isin(kind, (K.CREATE_ACCOUNT, K.TRANSFER, K.RESERVE, K.RELEASE))
    is_transfer = kind == K.TRANSFER
    pool = np.concatenate([a[uses_a], b[is_transfer], m_acct])
    uids = np.unique(pool[pool != 0])

    def pos(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = (np.searchsorted(uids, ids) + 1).astype(np.int32)
        out[~mask | (ids == 0)] = 0
        return out

    _, first_idx, first_inv = np.unique(did, return_index=True, return_inverse=True)
    first = (first_idx[first_inv.reshape(-1)] + 1).astype(np.int32)
    fin = (kind == K.TCC_CONFIRM) | (kind == K.TCC_CANCEL)
    fin_txns = np.unique(b[fin & (b != 0)])

    e = _Encoded()
    e.params = (did, kind, h["flags"].astype(np.int32), a, b, amt, ea, eb, cinv[:nh], first,
                pos(a, uses_a), pos(b, is_transfer), m0, mn, m["kind"].astype(np.int32),
                pos(m_acct, np.ones(len(m), dtype=bool)), m_amt, cinv[nh:], curs, uids, fin_txns)
    e.gsize = gsize
    e.hdr_dedup = h["dedup_id"]
    e.hdr_kind = h["kind"]
    e.n = len(ops)
    return e


def _results(e: _Encoded, codes: Sequence[int], dups: Sequence[bool], seqs: Sequence[int]) -> np.ndarray:
    out = np.zeros(e.n, dtype=R.RESULT_DTYPE)
    if e.n == 0:
        return out
    g = e.gsize
    out["dedup_id"] = np.repeat(e.hdr_dedup, g, axis=0)
    out["seq_num"] = np.repeat(np.asarray(seqs, dtype=np.int64), g).view(np.uint64)
    out["code"] = np.repeat(np.asarray(codes, dtype=np.uint16), g)
    out["flags"] = np.repeat(np.asarray(dups, dtype=np.uint8), g)
    out["kind"] = np.repeat(e.hdr_kind, g)
    return out


def _single_transfer_params(ops: np.ndarray) -> tuple | None:
    """(did, from, to, amount, currency, flags, expected_a, expected_b) if ops is exactly one TRANSFER."""
    if len(ops) != 1 or ops["kind"][0] != K.TRANSFER:
        return None
    check_batch(ops)
    return (int(_u64(ops["dedup_id"], "dedup_id")[0]), int(_u64(ops["account_id"], "account_id")[0]),
            int(_u64(ops["other_id"], "other_id")[0]), int(_i64(ops["amount"], "amount")[0]),
            _currency_text(bytes(ops["currency"][0])), int(ops["flags"][0]),
            int(_i64(ops["expected_a"], "expected_a")[0]), int(_i64(ops["expected_b"], "expected_b")[0]))


def _one_result(ops: np.ndarray, code: int, dup: bool, seq: int) -> np.ndarray:
    out = np.zeros(1, dtype=R.RESULT_DTYPE)
    out["dedup_id"] = ops["dedup_id"]
    out["seq_num"] = seq
    out["code"] = code
    out["flags"] = 1 if dup else 0
    out["kind"] = ops["kind"]
    return out


def _one(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """The row of a statement that always returns one (a function call, an aggregate)."""
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


def _retrying(fn: Callable[[], _T], retries: list[int] | None = None) -> _T:
    last: Exception | None = None
    for _ in range(RETRIES_MAX):
        try:
            return fn()
        except _RETRYABLE as exc:       # the whole statement (= transaction) was rolled back: run it again
            last = exc
            if retries is not None:
                retries[0] += 1
    raise RuntimeError(f"gave up after {RETRIES_MAX} retries: {last}") from last


def _apply_encoded(conn: psycopg.Connection, e: _Encoded, retries: list[int] | None = None) -> np.ndarray:
    if e.n == 0:
        return _results(e, [], [], [])
    codes, dups, seqs = _retrying(
        lambda: _one(conn.execute(APPLY_SQL, e.params, prepare=True, binary=True).fetchone()), retries)
    return _results(e, codes, dups, seqs)


# --------------------------------------------------------------------------------------- the ledger
class PgLedger:
    """The PostgreSQL baseline ledger. ``apply_batch``/``apply_one`` take the connection to use (one per
    client thread or process; see ``connect``); the rest use a connection of the PgLedger's own."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = connect(dsn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PgLedger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> psycopg.Connection:
        return connect(self.dsn)

    # ------------------------------------------------------------------------------------ set-up
    def create_schema(self) -> None:
        """(Re)create the tables, the sequence and the functions: every existing row is dropped."""
        with self.conn.transaction():
            self.conn.execute(SCHEMA_SQL, prepare=False)
            self.conn.execute(FUNCTIONS_SQL, prepare=False)

    def load_accounts(self, ids: Sequence[int] | np.ndarray, currency: str, lower_limit: int | None = 0,
                      initial_available: int | np.ndarray = 0, upper_limit: int | None = None,
                      analyze: bool = True) -> None:
        """Bulk-create accounts (binary COPY built with numpy: no per-row Python), version 1, NORMAL.
        Not commands: no dedup rows. Then VACUUM ANALYZE and a CHECKPOINT so a benchmark that follows
        does not pay for the load."""
        ids = np.asarray(ids, dtype=np.int64)
        n = ids.shape[0]
        cur = currency.encode("ascii")
        if _currency_text(cur) is None:
            raise ValueError(f"invalid currency {currency!r}")
        fields: list[tuple[str, str]] = [("nf", ">i2"), ("l_id", ">i4"), ("id", ">i8"), ("l_cur", ">i4"),
                                         ("cur", f"S{len(cur)}"), ("l_st", ">i4"), ("st", ">i2"),
                                         ("l_av", ">i4"), ("av", ">i8"), ("l_lo", ">i4")]
        if lower_limit is not None:
            fields.append(("lo", ">i8"))
        fields.append(("l_hi", ">i4"))
        if upper_limit is not None:
            fields.append(("hi", ">i8"))
        fields += [("l_ver", ">i4"), ("ver", ">i8")]
        rows = np.zeros(n, dtype=fields)
        rows["nf"] = 7
        rows["l_id"] = 8
        rows["id"] = ids
        rows["l_cur"] = len(cur)
        rows["cur"] = cur
        rows["l_st"] = 2
        rows["l_av"] = 8
        rows["av"] = initial_available
        if lower_limit is not None:
            rows["l_lo"] = 8
            rows["lo"] = lower_limit
        else:
            rows["l_lo"] = -1
        if upper_limit is not None:
            rows["l_hi"] = 8
            rows["hi"] = upper_limit
        else:
            rows["l_hi"] = -1
        rows["l_ver"] = 8
        rows["ver"] = 1
        payload = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0) + rows.tobytes() + struct.pack("!h", -1)
        with self.conn.transaction():
            with self.conn.cursor().copy("COPY accounts (id, currency, state, available, lower_limit, "
                                         "upper_limit, version) FROM STDIN WITH (FORMAT binary)") as cp:
                step = 8 << 20
                for off in range(0, len(payload), step):
                    cp.write(payload[off:off + step])
        if analyze:
            self.conn.execute("VACUUM ANALYZE accounts")
            self.conn.execute("CHECKPOINT")

    # ------------------------------------------------------------------------------------- commands
    def apply_batch(self, conn: psycopg.Connection | None, ops: np.ndarray) -> np.ndarray:
        """All commands of ``ops`` (OP_DTYPE, a well-formed zwallet batch) in ONE transaction and one round
        trip; one RESULT_DTYPE record per op record (group members repeat their header's)."""
        return _apply_encoded(conn or self.conn, encode_batch(ops))

    def apply_one(self, conn: psycopg.Connection | None, ops: np.ndarray) -> np.ndarray:
        """One command (its records: 1, or a group) in its own transaction. A single TRANSFER goes through
        ``zw_transfer`` (the cheaper function); anything else through ``zw_apply``."""
        conn = conn or self.conn
        p = _single_transfer_params(ops)
        if p is None:
            e = encode_batch(ops)
            if e.gsize.shape[0] != 1:
                raise ValueError(f"apply_one takes one command, got {e.gsize.shape[0]}")
            return _apply_encoded(conn, e)
        code, dup, seq = _retrying(lambda: _one(conn.execute(TRANSFER_SQL, p, prepare=True, binary=True).fetchone()))
        return _one_result(ops, code, dup, seq)

    # ------------------------------------------------------------------------------------------ reads
    def balances(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Available balances of ``ids`` (int64, same order); KeyError if one does not exist."""
        ids = np.asarray(ids, dtype=np.int64)
        row = _one(self.conn.execute(
            "SELECT array_agg(a.available ORDER BY u.o), array_agg(u.id ORDER BY u.o) FILTER (WHERE a.id IS NULL) "
            "FROM unnest(%b::bigint[]) WITH ORDINALITY u(id, o) LEFT JOIN accounts a ON a.id = u.id",
            (ids,), binary=True).fetchone())
        if row[1]:
            raise KeyError(f"no such accounts: {row[1][:10]}")
        return np.array(row[0] or [], dtype=np.int64)

    def get_account(self, account_id: int) -> dict | None:
        """The account like ``Ledger.get_account`` (reservations, pending entries of open TCC txns)."""
        row = self.conn.execute("SELECT id, currency, state, available, lower_limit, upper_limit, version "
                                "FROM accounts WHERE id = %s", (account_id,)).fetchone()
        if row is None:
            return None
        res: dict[int, int] = dict(self.conn.execute(
            "SELECT reservation_id, amount FROM reservations WHERE account_id = %s", (account_id,)).fetchall())
        pend = self.conn.execute("SELECT txn_id, pending_in, pending_out FROM tcc_pending WHERE account_id = %s",
                                 (account_id,)).fetchall()
        return {"account_id": row[0], "currency": row[1], "state": R.State(row[2]), "available": row[3],
                "reserved": sum(res.values()), "reservations": res,
                "pending_in": {t: i for t, i, _ in pend if i}, "pending_out": {t: o for t, _, o in pend if o},
                "lower_limit": row[4], "upper_limit": row[5], "version": row[6]}

    def totals(self, currency: str) -> dict[str, int]:
        """Sums over the accounts of one currency, like ``Ledger.totals``."""
        q = ("SELECT (SELECT coalesce(sum(available), 0) FROM accounts WHERE currency = %(c)s), "
             "(SELECT coalesce(sum(r.amount), 0) FROM reservations r JOIN accounts a ON a.id = r.account_id "
             " WHERE a.currency = %(c)s), "
             "(SELECT coalesce(sum(p.pending_in), 0) FROM tcc_pending p JOIN accounts a ON a.id = p.account_id "
             " WHERE a.currency = %(c)s), "
             "(SELECT coalesce(sum(p.pending_out), 0) FROM tcc_pending p JOIN accounts a ON a.id = p.account_id "
             " WHERE a.currency = %(c)s)")
        av, rs, pi, po = _one(self.conn.execute(q, {"c": currency}).fetchone())
        return {"available": int(av), "reserved": int(rs), "pending_in": int(pi), "pending_out": int(po)}

    def total(self, currency: str) -> int:
        """All the money the accounts of ``currency`` hold: available + reserved + pending_out (what
        transfers, reserve/release and TCC conserve)."""
        t = self.totals(currency)
        return t["available"] + t["reserved"] + t["pending_out"]

    def dedup_count(self) -> int:
        return _one(self.conn.execute("SELECT count(*) FROM dedup").fetchone())[0]


async def apply_one_async(conn: psycopg.AsyncConnection, ops: np.ndarray) -> np.ndarray:
    """``PgLedger.apply_one`` on an AsyncConnection (from ``connect_async``)."""
    p = _single_transfer_params(ops)
    if p is None:
        e = encode_batch(ops)
        if e.gsize.shape[0] != 1:
            raise ValueError(f"apply_one takes one command, got {e.gsize.shape[0]}")
        sql, params = APPLY_SQL, e.params
    else:
        sql, params = TRANSFER_SQL, p
    last: Exception | None = None
    for _ in range(RETRIES_MAX):
        try:
            cur = await conn.execute(sql, params, prepare=True, binary=True)
            row = _one(await cur.fetchone())
            break
        except _RETRYABLE as exc:
            last = exc
    else:
        raise RuntimeError(f"gave up after {RETRIES_MAX} retries: {last}") from last
    if p is None:
        return _results(e, *row)
    return _one_result(ops, *row)


# ------------------------------------------------------------------------ unbatched, many connections
def _unbatched_child(rows: bytes, positions: bytes, connections: int, rate: float | None,
                     duration_s: float | None, drain_s: float, dsn: str, ready: Any, go: Any, t0_shared: Any,
                     out: Any) -> None:
    """A ``bench.loadgen`` child: ``connections`` asyncio connections, one transfer per transaction."""
    ops, pos = loadgen.child_slice(rows, positions)
    m = len(ops)
    did = _u64(ops["dedup_id"], "dedup_id").tolist()
    fr = _u64(ops["account_id"], "account_id").tolist()
    to = _u64(ops["other_id"], "other_id").tolist()
    amt = _i64(ops["amount"], "amount").tolist()
    fl = ops["flags"].astype(np.int64).tolist()
    ea = _i64(ops["expected_a"], "expected_a").tolist()
    eb = _i64(ops["expected_b"], "expected_b").tolist()
    curs = {c: _currency_text(bytes(c)) for c in set(ops["currency"].tolist())}
    cur = [curs[c] for c in ops["currency"].tolist()]
    o = loadgen.Outcomes(m)
    lat, svc, lag, done, codes, dups, finished = (o.latency_s, o.service_s, o.send_lag_s, o.done_s, o.codes,
                                                  o.duplicate, o.finished)
    retries = 0
    cpu = [0.0]

    async def main() -> tuple[float, float]:
        conns = [await connect_async(dsn) for _ in range(connections)]
        for c in conns:      # prepare once, outside the timed part
            await c.execute("SELECT 1")
        ready.put(os.getpid())
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        t0 = loadgen.start_time(t0_shared)
        stop_at = t0 + duration_s if duration_s else float("inf")
        nxt = 0

        async def worker(conn: psycopg.AsyncConnection) -> None:
            nonlocal nxt, retries
            while True:
                j = nxt
                if j >= m:
                    return
                nxt += 1
                if rate:
                    due = t0 + pos[j] / rate
                    if due >= stop_at or time.perf_counter() >= stop_at + drain_s:
                        return                     # past the window (and its drain): never sent
                    delay = due - time.perf_counter()
                    if delay > 0:                  # a connection was free before it was due: send it then
                        await asyncio.sleep(delay)
                        start_at = time.perf_counter()     # (asyncio's timer may overshoot by up to 1 ms:
                    else:                                  # the client's slack, not the system's latency)
                        start_at = due                     # every connection was busy: the wait counts
                    sent = time.perf_counter()
                    lag[j] = sent - due
                else:
                    sent = start_at = time.perf_counter()
                    if sent >= stop_at:
                        return
                params = (did[j], fr[j], to[j], amt[j], cur[j], fl[j], ea[j], eb[j])
                for _ in range(RETRIES_MAX):
                    try:
                        c = await conn.execute(TRANSFER_SQL, params, prepare=True, binary=True)
                        row = _one(await c.fetchone())
                        break
                    except _RETRYABLE:
                        retries += 1
                else:
                    raise RuntimeError("gave up retrying a transfer")
                end = done[j] = time.perf_counter()
                lat[j] = end - start_at
                svc[j] = end - sent
                codes[j] = row[0]
                dups[j] = row[1]
                finished[j] = True

        start = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(worker(c) for c in conns))
        end = time.perf_counter()
        cpu[0] = time.process_time() - cpu0
        for c in conns:
            await c.close()
        return start, end

    start, end = asyncio.run(main())
    out.put(o.result(pos, start, end, retries, cpu[0], int(np.count_nonzero(finished))))


def run_unbatched(dsn: str, ops: np.ndarray, connections: int = 64, processes: int = 2,
                  rate: float | None = None, duration_s: float | None = None,
                  drain_s: float = loadgen.DRAIN_S_DEFAULT) -> dict[str, Any]:
    """Send ``ops`` (single TRANSFER records, one command each) one transfer per transaction over
    ``connections`` connections spread over ``processes`` processes (asyncio in each, so the Python client
    is not the bottleneck; ``client_cpu_s`` shows what it used), closed or open loop (``rate``), for the
    whole stream or ``duration_s``: see ``bench.loadgen``. In the open loop a connection that is free before a
    transfer is due sends it then and its latency runs from the send (asyncio's timer can overshoot by up to
    1 ms: the client's slack, in ``send_lag_s``); if every connection was busy when it fell due, its latency
    runs from the due time, so the wait counts. ``retries``: transactions rolled back by a unique violation
    or a deadlock and sent again. Returns ``bench.loadgen.run_processes``'s dict."""
    if ops.dtype != R.OP_DTYPE or not (ops["kind"] == K.TRANSFER).all() or not (ops["group_size"] == 1).all():
        raise ValueError("run_unbatched takes single TRANSFER records")
    check_batch(ops[: R.BATCH_SIZE_MAX]) if len(ops) else None
    return loadgen.run_processes(_unbatched_child, ops, connections=connections, processes=processes, rate=rate,
                                 duration_s=duration_s, drain_s=drain_s, extra=(dsn,))


# -------------------------------------------------------------------------- batched, many connections
def run_batched(dsn: str, batches: Sequence[np.ndarray], connections: int = 1, duration_s: float | None = None,
                keep_results: bool = True) -> dict[str, Any]:
    """Apply ``batches`` (each one transaction, as ``PgLedger.apply_batch``) over ``connections``
    connections, one thread each (psycopg releases the GIL while it waits; the encoding is numpy), each
    taking the next batch as soon as its previous one committed; with ``duration_s``, no batch is started
    after that long (``batches`` may then be a lazy sequence, e.g. ``engine.devtools.workload.BatchStream``). Concurrent
    batches that name the same accounts wait for each other's row locks: that is the baseline's behaviour,
    measured as it is.

    Returns ``{"results": [RESULT_DTYPE array per completed batch, in stream order] (if keep_results),
    "latency_s", "done_s" (perf_counter at each commit), "sizes" (records): per completed batch, in stream
    order; "t0" (perf_counter at the start), "wall_s", "records", "batches", "not_ok", "duplicates", "retries"}``
    (retries: requests rolled back by a unique violation or deadlock and sent again)."""
    import threading
    n = len(batches)
    results: dict[int, np.ndarray] = {}
    lat: dict[int, float] = {}
    done: dict[int, float] = {}
    conns = [connect(dsn) for _ in range(connections)]
    if duration_s is None:               # client-side work, done before the clock starts
        encoded = [encode_batch(b) for b in batches]
    nxt = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []
    retries = [0]                          # += under the GIL from several threads: a count, not exact
    start = time.perf_counter()
    stop_at = start + duration_s if duration_s else float("inf")

    def worker(conn: psycopg.Connection) -> None:
        try:
            while True:
                with lock:
                    j = nxt[0]
                    nxt[0] += 1
                if j >= n or time.perf_counter() >= stop_at:
                    return
                e = encoded[j] if duration_s is None else encode_batch(batches[j])
                t = time.perf_counter()
                results[j] = _apply_encoded(conn, e, retries)
                done[j] = end = time.perf_counter()
                lat[j] = end - t
        except BaseException as exc:       # noqa: BLE001 - reported to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in conns:
        c.close()
    if errors:
        raise errors[0]
    order = sorted(results)
    res = [results[j] for j in order]
    out = {"latency_s": np.array([lat[j] for j in order]), "done_s": np.array([done[j] for j in order]),
           "sizes": np.array([len(r) for r in res], dtype=np.int64), "t0": start, "wall_s": wall,
           "records": int(sum(len(r) for r in res)), "batches": len(res),
           "not_ok": int(sum(np.count_nonzero(r["code"] != R.Code.OK) for r in res)),
           "duplicates": int(sum(np.count_nonzero(r["flags"] & R.ResultFlag.DUPLICATE) for r in res)),
           "retries": retries[0]}
    if keep_results:
        out["results"] = res
    return out


# ------------------------------------------------------------------------------------------- smoke
def _random_transfers(rng: np.random.Generator, first_dedup: int, n: int, accounts: np.ndarray,
                      hot: int | None = None) -> np.ndarray:
    """``n`` uniform random transfers among ``accounts`` (50% from ``hot`` if given); any length."""
    if n > R.BATCH_SIZE_MAX:
        return np.concatenate([_random_transfers(rng, first_dedup + k, min(R.BATCH_SIZE_MAX, n - k), accounts, hot)
                               for k in range(0, n, R.BATCH_SIZE_MAX)])
    a = rng.choice(accounts, n)
    b = rng.choice(accounts, n)
    same = a == b
    b[same] = np.where(b[same] == accounts[0], accounts[1], accounts[0])
    if hot is not None:
        h = rng.random(n) < 0.5
        a[h] = hot
        b[h & (b == hot)] = accounts[1] if hot != accounts[1] else accounts[2]
    return R.transfers(np.arange(first_dedup, first_dedup + n, dtype=np.int64), a, b,
                       rng.integers(1, 100, n), "USD")


def smoke(accounts: int = 100_000, batches: int = 5, unbatched_s: float = 10.0, connections: int = 64,
          processes: int = 2) -> None:
    """Rough numbers, to know the baseline's order of magnitude (the real comparison is the bench)."""
    from engine.devtools.pg_server import PostgresServer
    from engine.devtools.workload import Workload
    with tempfile.TemporaryDirectory(prefix="zwallet-pg-smoke-") as base, PostgresServer(base) as pg:
        s = pg.settings()
        print("settings: " + ", ".join(f"{k}={s[k]}" for k in ("server_version", "fsync", "synchronous_commit",
                                                                "full_page_writes", "wal_sync_method")))
        with open("/proc/loadavg") as f:
            print(f"load average before: {f.read().split()[0]} on {os.cpu_count()} cores")
        with PgLedger(pg.dsn) as led:
            led.create_schema()
            ids = np.arange(1, accounts + 1, dtype=np.int64)
            t = time.perf_counter()
            led.load_accounts(ids, "USD", lower_limit=0, initial_available=1_000_000, analyze=False)
            hot_id = accounts + 1          # the hot account: a bank account, may go negative
            led.load_accounts([hot_id], "USD", lower_limit=None, initial_available=0)
            print(f"load {accounts:,} accounts (COPY + VACUUM ANALYZE + CHECKPOINT): {time.perf_counter() - t:.2f} s")
            rng = np.random.default_rng(1)
            dedup = 1

            def stream(n: int, hot: int | None = None) -> np.ndarray:
                nonlocal dedup
                ops = _random_transfers(rng, dedup, n, ids, hot)
                dedup += n
                return ops

            for label, hot in (("uniform", None), ("hot account (50%)", hot_id)):
                for conns in (1, 2):
                    bs = [stream(R.BATCH_SIZE_MAX, hot) for _ in range(batches)]
                    time.sleep(0.3)
                    cpu0 = pg.cpu_seconds()
                    r = run_batched(pg.dsn, bs, connections=conns)
                    time.sleep(0.3)          # let the postmaster reap the closed backends: their CPU counts
                    cpu = pg.cpu_seconds() - cpu0
                    assert all((x["code"] == 0).all() for x in r["results"])
                    print(f"batched, {label}, {conns} connection(s): {batches} x 8190 transfers, one transaction "
                          f"each: {r['records'] / r['wall_s']:,.0f} transfers/s; batch latency ms median "
                          f"{1000 * np.median(r['latency_s']):.0f}; postgres CPU {cpu / r['wall_s']:.2f} cores")
            for label, hot, secs in (("uniform", None, unbatched_s), ("hot account (50%)", hot_id, unbatched_s / 2)):
                probe = stream(1000, hot)
                r = run_unbatched(pg.dsn, probe, connections=connections, processes=processes)
                n = int(max(1000, r["count"] / r["wall_s"] * secs))
                ops = stream(n, hot)
                time.sleep(0.3)
                cpu0 = pg.cpu_seconds()
                r = run_unbatched(pg.dsn, ops, connections=connections, processes=processes)
                time.sleep(0.3)          # let the postmaster reap the closed backends: their CPU counts
                cpu = pg.cpu_seconds() - cpu0
                assert (r["codes"] == 0).all()
                lat = r["latency_s"] * 1000
                print(f"unbatched, {label}: {n:,} transfers, one per transaction, {connections} connections in "
                      f"{processes} processes: {n / r['wall_s']:,.0f} transfers/s over {r['wall_s']:.1f} s; "
                      f"latency ms p50 {np.percentile(lat, 50):.2f} p99 {np.percentile(lat, 99):.2f} "
                      f"max {lat.max():.1f}; retries {r['retries']}; CPU cores busy: client "
                      f"{r['client_cpu_s'] / r['wall_s']:.2f}, postgres {cpu / r['wall_s']:.2f}")
            for rate in (1_000.0,):
                ops = stream(int(rate * 3))
                r = run_unbatched(pg.dsn, ops, connections=connections, processes=processes, rate=rate)
                assert (r["codes"] == 0).all()
                lat = r["latency_s"][int(rate * 0.5):] * 1000          # the first 0.5 s is warm-up
                print(f"unbatched, uniform, open loop at {rate:,.0f}/s offered for 3 s: latency ms p50 "
                      f"{np.percentile(lat, 50):.2f} p99 {np.percentile(lat, 99):.2f} max {lat.max():.1f}")
            tot = led.totals("USD")
            assert tot["available"] == accounts * 1_000_000, tot
            print(f"money conserved: sum of available = {tot['available']:,}")

            # the mixed workload (engine/devtools/workload.py), on a fresh schema: accounts created by commands
            led.create_schema()
            w = Workload(20_000, seed=3)
            conn = led.connect()
            for b in w.create():
                assert (led.apply_batch(conn, b)["code"] == 0).all()
            mixed = [w.mixed(R.BATCH_SIZE_MAX) for _ in range(max(2, batches))]
            r = run_batched(pg.dsn, mixed, connections=1)
            ok = sum(int((x["code"] == 0).sum()) for x in r["results"])
            print(f"mixed batches (transfers, batch balance ops, reserve/release, TCC try/confirm): "
                  f"{r['records'] / r['wall_s']:,.0f} records/s, {ok / r['records']:.1%} of records OK; "
                  f"total held {led.total('USD')} (0: conserved)")
            conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="start a private PostgreSQL and print rough numbers")
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--unbatched-s", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--processes", type=int, default=2)
    a = p.parse_args(argv)
    if not a.smoke:
        p.print_help()
        return 2
    smoke(a.accounts, a.batches, a.unbatched_s, a.connections, a.processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
