"""bench scale: the collectives' bytes read from HLO text, and one measurement on this process's single device."""

import numpy as np

from optax_second_order.bench import scale

HLO = """
  %all-reduce.6 = (f32[256]{0}, f32[256,64]{1,0}, /*index=2*/f64[10]{0}) all-reduce(%a, %b, %c), replica_groups={}
  %all-gather.1 = f32[8,4,4]{2,1,0} all-gather(%d), dimensions={0}
  %all-gather-done = f32[8]{0} all-gather-done(%e)
  %add = f32[256]{0} add(%x, %y)
"""


def test_collective_bytes_sums_every_collective_result_once():
    assert scale.collective_bytes(HLO) == 4 * (256 + 256 * 64) + 8 * 10 + 4 * 8 * 4 * 4


def test_measure_on_one_device_reports_the_whole_state_on_device_zero():
    rows = scale.measure("digits-mlp", steps=1)
    assert [r["optimizer"] for r in rows] == ["adam", "shampoo", "soap", "kfac"]
    for r in rows:
        assert r["devices"] == 1 and r["state_bytes_device0"] == r["state_bytes"] and r["collective_bytes"] == 0
        assert r["stack_bytes_device0"] == r["stack_bytes"] and np.isfinite(r["mean_step_s"])
    assert rows[0]["stack_bytes"] == 0 and all(r["stack_bytes"] > 0 for r in rows[1:])
    assert "| digits-mlp | soap | 1 |" in scale.table(rows)
