"""Pure pieces: the latency model, fault updates, the KV store and its wire frames."""
from __future__ import annotations

import asyncio

import pytest

from pd_launcher.emulator import kvnet
from pd_launcher.emulator.kvstore import BlockStore, KVError, build, layout
from pd_launcher.emulator.settings import Faults, Latency, SettingsError


def test_latency_model():
    lat = Latency.from_env({"PD_EMU_PREFILL_S_PER_TOKEN": "0.001", "PD_EMU_PREFILL_OVERHEAD_S":
                            "0.01", "PD_EMU_ITL_S": "0.02", "PD_EMU_CONCURRENCY_SLOWDOWN": "0.5",
                            "PD_EMU_KV_BANDWIDTH_MBPS": "100"})
    assert lat.prefill_s(100, 1) == pytest.approx(0.11)
    assert lat.prefill_s(100, 3) == pytest.approx(0.22)  # 1 + 0.5 * 2
    assert lat.itl(1) == pytest.approx(0.02) and lat.itl(5) == pytest.approx(0.06)
    assert lat.transfer_s(50_000_000) == pytest.approx(0.5)
    zero = Latency.from_env({"PD_EMU_ZERO_LATENCY": "1", "PD_EMU_ITL_S": "5"})
    assert (zero.prefill_s(10_000, 9), zero.itl(9), zero.transfer_s(10**9)) == (0, 0, 0)
    with pytest.raises(SettingsError, match="PD_EMU_KV_BYTES_PER_TOKEN='0' must be >= 1"):
        Latency.from_env({"PD_EMU_KV_BYTES_PER_TOKEN": "0"})
    with pytest.raises(SettingsError, match="PD_EMU_ZERO_LATENCY='maybe' is not a boolean"):
        Latency.from_env({"PD_EMU_ZERO_LATENCY": "maybe"})


def test_fault_updates_are_validated():
    f = Faults.from_env({"PD_EMU_ERROR_RATE": "0.25", "PD_EMU_SEED": "7"})
    assert f.error_rate == 0.25
    f.update({"hang": True, "exit_after": 3, "kv_corrupt_rate": 1})
    assert (f.hang, f.exit_after, f.kv_corrupt_rate) == (True, 3, 1.0)
    for bad in ({"hang": 1}, {"exit_after": -1}, {"error_rate": 1.5}, {"nope": 1}):
        with pytest.raises(SettingsError):
            f.update(bad)
    assert f.hang is True  # a rejected update changes nothing
    with pytest.raises(SettingsError):
        Faults.from_env({"PD_EMU_ERROR_RATE": "2"})


def test_block_store_lease_free_and_tombstones():
    async def main():
        changes = []
        store = BlockStore(0.05, lambda b, n, e: changes.append((b, n, e)))
        blocks, tokens = build("m", "k", 40, 16, 8)
        assert tokens == layout(40, 16) == [16, 16, 8] and [len(b) for b in blocks] == [
            128, 128, 64]
        ids = store.hold("r1", blocks, tokens)
        assert store.lookup(ids) == (blocks, tokens) and store.held_blocks == 3
        assert store.free(ids) == 3 and store.held_bytes == 0
        with pytest.raises(KVError) as exc:
            store.lookup(ids[:1])
        assert exc.value.cause == "unknown_blocks" and "already freed" in str(exc.value)
        ids2 = store.hold("r2", blocks, tokens)
        assert set(ids2).isdisjoint(ids)
        await asyncio.sleep(0.1)
        with pytest.raises(KVError) as exc:
            store.lookup(ids2)
        assert exc.value.cause == "expired_blocks"
        assert changes[-1] == (0, 0, 3)  # expiry reported 3 expired blocks
        with pytest.raises(KVError) as exc:
            store.lookup([1])
        assert exc.value.cause == "unknown_blocks" and "unknown id" in str(exc.value)

    asyncio.run(main())


def test_frames_carry_a_checksum():
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(kvnet.encode(kvnet.BLOCKS, {"a": 1}, b"payload") + b"payload")
        reader.feed_data(kvnet.encode(kvnet.BLOCKS, {"a": 2}, b"payload") + b"paYload")
        reader.feed_data(b"HTTP/1.1 200 OK\r\n\r\n")
        reader.feed_eof()
        assert await kvnet.read_frame(reader) == (kvnet.BLOCKS, {"a": 1}, b"payload", True)
        assert (await kvnet.read_frame(reader))[3] is False
        with pytest.raises(KVError) as exc:
            await kvnet.read_frame(reader)
        assert exc.value.cause == "protocol_error"

    asyncio.run(main())
