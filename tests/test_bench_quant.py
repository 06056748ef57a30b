"""benchmarks/quant_speed.py's timeline part: quantized presets and the issue-19 target."""

from __future__ import annotations

from conftest import load_script

from moe.offload import timeline
from moe.quant import quantized_expert_bytes


def test_quantized_presets_and_int4_target_on_h100_mixtral() -> None:
    bench = load_script("benchmarks/quant_speed.py", "quant_speed")
    hw = timeline.PRESETS["h100-mixtral"]
    int4 = bench.quantized_hardware(hw, 4096, 14336, "int4")
    assert int4.expert_bytes == quantized_expert_bytes(4096, 14336, "int4", group_size=64)
    assert bench.quantized_hardware(hw, 4096, 14336, None) is hw
    rows: list[dict] = []
    bench.run_timeline(rows, policies=("lru",))
    at = {(r["preset"], r["scheme"], r["cache"]): r for r in rows}
    same = at[("h100-mixtral", "int4", "same count")]
    bf16 = at[("h100-mixtral", "bf16", "same count")]
    # int4 moves 4.5 / 16 of the bytes: the transfer-bound preset's ms/token follows (target <= 0.35x)
    assert same["vs_bf16"] <= 0.35
    assert same["bytes_per_token"] < 0.3 * bf16["bytes_per_token"]
    # with the cache's bytes fixed, more int4 experts fit: fewer misses still
    assert at[("h100-mixtral", "int4", "same bytes")]["sim_ms_per_token"] < same["sim_ms_per_token"]
