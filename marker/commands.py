"""What a Marker Raft entry carries: commands, workflow specs, and their compact versioned encoding.

An entry is ``ENTRY_MAGIC`` (b"ZMK1": the format version is its last byte) followed by one msgpack array
``[timestamp_ms, [command, ...]]``; every command is a msgpack array whose first element is its tag:

    [1, spec]                                   SUBMIT     a workflow (TccSpec or SagaSpec, below)
    [2, [[workflow_id, job_index, attempt, code, seq], ...]]
                                                JOB_RESULTS definite job results from the leader's driver
    [3, on]                                     DRAIN      refuse new workflows (True) or accept them again

    TccSpec  = [1, workflow_id, issued_ms, deadline_ms, [[account_id, amount, currency], ...]]
    SagaSpec = [2, workflow_id, issued_ms, deadline_ms, [step, ...]]
      step   = [6, from_id, to_id, amount, currency, expected_from | nil, expected_to | nil]   TRANSFER
             | [7, [[account_id, amount, currency], ...], [[account_id, expected_available], ...]]  BATCH_BALANCE

Ids (workflow, account) are 16-byte little-endian unsigned and amounts 16-byte little-endian two's
complement (msgpack ints stop at 64 bits; the ledger's are 128). An entry with no command is a tick: its
timestamp alone advances the machine's time. ``issued_ms`` is when the client first issued the workflow,
the same on every re-submit (the machine's dedup horizon is kept on it); ``deadline_ms`` is absolute.

Decoding checks the entry's size before decoding, then the types (msgspec), then ``validate_spec`` checks
everything else a client sent; nothing here asserts on input.
"""
from __future__ import annotations

from typing import Any

import msgspec

from engine.records import CURRENCY_SIZE_MAX, GROUP_SPECS_MAX, I128_MAX, I128_MIN, U128_MAX

ENTRY_MAGIC = b"ZMK1"
ENTRY_BYTES_MAX = 16 << 20               # a Marker entry, checked before decoding
ENTRY_COMMANDS_MAX = 4096                # commands in one entry
JOB_RESULTS_MAX = 65_536                 # results in one JOB_RESULTS command
TCC_LEGS_MAX = GROUP_SPECS_MAX           # legs of one TCC transfer (so one shard's try always fits a group)
SAGA_STEPS_MAX = 64                      # steps of one saga
DEADLINE_AHEAD_MAX_MS = 3_600_000        # a deadline at most this far past the creating entry's time
WORKFLOW_KIND_TCC = 1
WORKFLOW_KIND_SAGA = 2
STEP_TRANSFER = 6                        # = engine.records.Kind.TRANSFER
STEP_BATCH_BALANCE = 7                   # = engine.records.Kind.BATCH_BALANCE


# ------------------------------------------------------------------------------------------ wire types
class TccSpec(msgspec.Struct, array_like=True, tag=WORKFLOW_KIND_TCC, frozen=True):
    workflow_id: bytes
    issued_ms: int
    deadline_ms: int
    legs: list[tuple[bytes, bytes, str]]


class TransferStep(msgspec.Struct, array_like=True, tag=STEP_TRANSFER, frozen=True):
    from_id: bytes
    to_id: bytes
    amount: bytes
    currency: str
    expected_from: bytes | None = None
    expected_to: bytes | None = None


class BatchStep(msgspec.Struct, array_like=True, tag=STEP_BATCH_BALANCE, frozen=True):
    specs: list[tuple[bytes, bytes, str]]
    preconditions: list[tuple[bytes, bytes]] = []


class SagaSpec(msgspec.Struct, array_like=True, tag=WORKFLOW_KIND_SAGA, frozen=True):
    workflow_id: bytes
    issued_ms: int
    deadline_ms: int
    steps: list[TransferStep | BatchStep]


WorkflowSpec = TccSpec | SagaSpec


class Submit(msgspec.Struct, array_like=True, tag=1, frozen=True):
    spec: TccSpec | SagaSpec


class JobResults(msgspec.Struct, array_like=True, tag=2, frozen=True):
    # (workflow_id, job_index, attempt, code, seq)
    results: list[tuple[bytes, int, int, int, int]]


class Drain(msgspec.Struct, array_like=True, tag=3, frozen=True):
    on: bool


Command = Submit | JobResults | Drain

_encoder = msgspec.msgpack.Encoder()
_entry_decoder = msgspec.msgpack.Decoder(tuple[int, list[Command]])
_spec_decoder = msgspec.msgpack.Decoder(TccSpec | SagaSpec)


# --------------------------------------------------------------------------------------- int helpers
def u128_bytes(v: int) -> bytes:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= U128_MAX:
        raise ValueError(f"{v!r} is not a u128")
    return v.to_bytes(16, "little")


def i128_bytes(v: int) -> bytes:
    if not isinstance(v, int) or isinstance(v, bool) or not I128_MIN <= v <= I128_MAX:
        raise ValueError(f"{v!r} is not an i128")
    return v.to_bytes(16, "little", signed=True)


def bytes_u128(b: bytes) -> int:
    if len(b) != 16:
        raise ValueError(f"a u128 is 16 bytes, not {len(b)}")
    return int.from_bytes(b, "little")


def bytes_i128(b: bytes) -> int:
    if len(b) != 16:
        raise ValueError(f"an i128 is 16 bytes, not {len(b)}")
    return int.from_bytes(b, "little", signed=True)


# -------------------------------------------------------------------------------------- spec builders
def tcc_spec(workflow_id: int, legs: list[tuple[int, int, str]], *, issued_ms: int, deadline_ms: int) -> TccSpec:
    """A TCC transfer: legs ``(account_id, signed amount, currency)``, zero-sum per currency."""
    return TccSpec(u128_bytes(workflow_id), issued_ms, deadline_ms,
                   [(u128_bytes(a), i128_bytes(m), c) for a, m, c in legs])


def transfer(workflow_id: int, from_id: int, to_id: int, amount: int, currency: str, *, issued_ms: int,
             deadline_ms: int) -> TccSpec:
    """The two-leg TCC transfer of ``amount`` from ``from_id`` to ``to_id``."""
    return tcc_spec(workflow_id, [(from_id, -amount, currency), (to_id, amount, currency)],
                    issued_ms=issued_ms, deadline_ms=deadline_ms)


def transfer_step(from_id: int, to_id: int, amount: int, currency: str, expected_from: int | None = None,
                  expected_to: int | None = None) -> TransferStep:
    return TransferStep(u128_bytes(from_id), u128_bytes(to_id), i128_bytes(amount), currency,
                        None if expected_from is None else i128_bytes(expected_from),
                        None if expected_to is None else i128_bytes(expected_to))


def batch_step(specs: list[tuple[int, int, str]], preconditions: list[tuple[int, int]] | None = None) -> BatchStep:
    return BatchStep([(u128_bytes(a), i128_bytes(m), c) for a, m, c in specs],
                     [(u128_bytes(a), i128_bytes(e)) for a, e in preconditions or ()])


def saga_spec(workflow_id: int, steps: list[TransferStep | BatchStep], *, issued_ms: int,
              deadline_ms: int) -> SagaSpec:
    return SagaSpec(u128_bytes(workflow_id), issued_ms, deadline_ms, list(steps))


# --------------------------------------------------------------------------------------------- entries
def encode_entry(commands: list[Command], timestamp_ms: int) -> bytes:
    """One Marker log entry holding ``commands`` (Submit / JobResults / Drain), stamped ``timestamp_ms``."""
    if not 0 <= timestamp_ms < 1 << 64:
        raise ValueError(f"timestamp {timestamp_ms} is not a u64")
    if len(commands) > ENTRY_COMMANDS_MAX:
        raise ValueError(f"an entry holds at most {ENTRY_COMMANDS_MAX} commands, not {len(commands)}")
    data = ENTRY_MAGIC + _encoder.encode((timestamp_ms, list(commands)))
    if len(data) > ENTRY_BYTES_MAX:
        raise ValueError(f"an entry of {len(data)} bytes is over ENTRY_BYTES_MAX={ENTRY_BYTES_MAX}")
    return data


def decode_entry(data: bytes | memoryview) -> tuple[int, list[Command]]:
    """(timestamp_ms, commands). ValueError (with a reason) if the entry is not well formed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"an entry is bytes, not {type(data).__name__}")
    if len(data) > ENTRY_BYTES_MAX:
        raise ValueError(f"entry of {len(data)} bytes is over ENTRY_BYTES_MAX={ENTRY_BYTES_MAX}")
    if bytes(data[:4]) != ENTRY_MAGIC:
        raise ValueError("not a Marker entry (magic/version)")
    try:
        ts, commands = _entry_decoder.decode(memoryview(data)[4:])
    except msgspec.MsgspecError as exc:
        raise ValueError(f"malformed Marker entry: {exc}") from None
    if not 0 <= ts < 1 << 64:
        raise ValueError("entry timestamp is not a u64")
    if len(commands) > ENTRY_COMMANDS_MAX:
        raise ValueError(f"entry holds {len(commands)} commands, over ENTRY_COMMANDS_MAX={ENTRY_COMMANDS_MAX}")
    return ts, commands


def encode_spec(spec: WorkflowSpec) -> bytes:
    return _encoder.encode(spec)


def decode_spec(data: bytes) -> WorkflowSpec:
    return _spec_decoder.decode(data)


# ------------------------------------------------------------------------------------------ validation
def _currency(c: Any) -> None:
    raw = c.encode("ascii", "replace") if isinstance(c, str) else b""
    if not 1 <= len(raw) <= CURRENCY_SIZE_MAX or not all(0x21 <= b <= 0x7E for b in raw) or raw != c.encode():
        raise ValueError(f"invalid currency {c!r}: 1 to {CURRENCY_SIZE_MAX} printable ASCII characters")


def _account(b: bytes, what: str) -> int:
    v = bytes_u128(b)
    if v == 0:
        raise ValueError(f"{what}: account id 0")
    return v


def validate_spec(spec: WorkflowSpec, now_ms: int) -> None:
    """Everything a client's spec must satisfy beyond its types; ValueError naming the first violation.
    (Which shard each account is on is checked by the machine, which holds the shard map.)"""
    wid = bytes_u128(spec.workflow_id)
    if wid == 0:
        raise ValueError("workflow id 0")
    if not 0 <= spec.issued_ms < 1 << 64 or not 0 <= spec.deadline_ms < 1 << 64:
        raise ValueError("issued_ms and deadline_ms are u64 milliseconds")
    if spec.deadline_ms <= now_ms:
        raise ValueError(f"deadline {spec.deadline_ms} already passed (now {now_ms})")
    if spec.deadline_ms - now_ms > DEADLINE_AHEAD_MAX_MS:
        raise ValueError(f"deadline more than DEADLINE_AHEAD_MAX_MS={DEADLINE_AHEAD_MAX_MS} ahead")
    if isinstance(spec, TccSpec):
        if not 2 <= len(spec.legs) <= TCC_LEGS_MAX:
            raise ValueError(f"a TCC transfer has 2..{TCC_LEGS_MAX} legs, not {len(spec.legs)}")
        sums: dict[str, int] = {}
        seen: set[int] = set()
        for k, (a, m, c) in enumerate(spec.legs):
            acct = _account(a, f"leg {k}")
            if acct in seen:
                raise ValueError(f"leg {k}: account {acct} appears twice")
            seen.add(acct)
            amount = bytes_i128(m)
            if amount == 0:
                raise ValueError(f"leg {k}: amount 0")
            _currency(c)
            sums[c] = sums.get(c, 0) + amount
        bad = sorted(c for c, s in sums.items() if s != 0)
        if bad:
            raise ValueError(f"legs do not sum to zero in {bad}")
        return
    if not 1 <= len(spec.steps) <= SAGA_STEPS_MAX:
        raise ValueError(f"a saga has 1..{SAGA_STEPS_MAX} steps, not {len(spec.steps)}")
    for k, st in enumerate(spec.steps):
        if isinstance(st, TransferStep):
            if _account(st.from_id, f"step {k} from") == _account(st.to_id, f"step {k} to"):
                raise ValueError(f"step {k}: same account")
            if bytes_i128(st.amount) <= 0:
                raise ValueError(f"step {k}: amount must be > 0")
            _currency(st.currency)
            for e in (st.expected_from, st.expected_to):
                if e is not None:
                    bytes_i128(e)
        else:
            n = len(st.specs) + len(st.preconditions)
            if not st.specs or n > GROUP_SPECS_MAX:
                raise ValueError(f"step {k}: a batch step has 1..{GROUP_SPECS_MAX} specs + preconditions")
            for a, m, c in st.specs:
                _account(a, f"step {k} spec")
                if bytes_i128(m) == 0:
                    raise ValueError(f"step {k}: spec amount 0")
                _currency(c)
            for a, e in st.preconditions:
                _account(a, f"step {k} precondition")
                bytes_i128(e)


def step_accounts(step: TransferStep | BatchStep) -> list[int]:
    if isinstance(step, TransferStep):
        return [bytes_u128(step.from_id), bytes_u128(step.to_id)]
    return [bytes_u128(a) for a, _, _ in step.specs] + [bytes_u128(a) for a, _ in step.preconditions]


def spec_accounts(spec: TccSpec | SagaSpec) -> list[int]:
    """Every account id a workflow spec names (its legs, or its steps' from/to, specs and preconditions):
    what a key restricted to account ranges must cover to submit it (docs/security.md)."""
    raw: list[bytes] = []
    if isinstance(spec, TccSpec):
        raw = [leg[0] for leg in spec.legs]
    else:
        for step in spec.steps:
            if isinstance(step, TransferStep):
                raw += [step.from_id, step.to_id]
            else:
                raw += [s[0] for s in step.specs] + [c[0] for c in step.preconditions]
    return [int.from_bytes(b, "little") for b in raw]


def workflow_refusal(rights: Any, specs: list[TccSpec | SagaSpec], shard_map: Any) -> str:
    """Why a key with ``rights`` (engine.service.security.Rights) may not submit ``specs`` ("" if it may):
    every account they name must lie in its ranges, on one of its shards. The Marker checks it for a
    restricted key, and the gateway for its restricted callers, in the same words."""
    for spec in specs:
        wid = int.from_bytes(spec.workflow_id, "little")
        ids = spec_accounts(spec)
        bad = rights.outside(ids)
        if bad is not None:
            return f"workflow {wid}: account {bad} is outside the ranges of {rights.describe()}"
        if rights.shards:
            for a in ids:
                s = shard_map.shard_of(a)
                if not rights.allows_shard(s):
                    return f"workflow {wid}: account {a} is on shard {s}, which {rights.describe()} may not reach"
    return ""
