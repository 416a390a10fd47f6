"""Resolution of the recompute settings into per-layer sets (pure Python)."""

import pytest

from mindspeed_ms.core.config.fields import ConfigValueError
from mindspeed_ms.core.config.recompute import (check_recompute_shapes, layers_for_value,
                                                 resolve_recompute)


def test_value_forms():
    assert layers_for_value(True, num_layers=3) == {0, 1, 2}
    assert layers_for_value(None, num_layers=3) == set()
    assert layers_for_value(2, num_layers=3) == {0, 1}
    assert layers_for_value([1, 3], num_layers=4, pp_rank=1, pp_size=2) == {0, 1, 2}
    assert layers_for_value([[4, 4], [4, 2]], num_layers=4, pp_rank=1, pp_size=2,
                            vpp_rank=1, vpp_size=2) == {0, 1}
    # rows are virtual chunks, columns stages (num_layer_list's layout): pp=3, vpp=2
    grid = [[0, 1, 2], [3, 0, 1]]
    got = {(v, p): len(layers_for_value(grid, num_layers=4, pp_rank=p, pp_size=3, vpp_rank=v,
                                        vpp_size=2)) for v in range(2) for p in range(3)}
    assert got == {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 3, (1, 1): 0, (1, 2): 1}
    # the guide quotes its lists in YAML
    assert layers_for_value("[[4,4],[4,2]]", num_layers=4, pp_rank=1, pp_size=2,
                            vpp_rank=1, vpp_size=2) == {0, 1}
    assert layers_for_value("True", num_layers=2) == {0, 1}
    assert layers_for_value(5, num_layers=2) == {0, 1}


@pytest.mark.parametrize("value,kw", [
    ([1, 2, 3], dict(pp_size=2)),
    ([[1, 1], [1]], dict(pp_size=2, vpp_size=2, vpp_rank=0)),
    ([[1], [1]], dict(pp_size=2)),
    ("full", {}),
    ("feed_forward.mul", {}),
    (["feed_forward.mul"], {}),
    ([True, 1], dict(pp_size=2)),
    ([-1, 1], dict(pp_size=2)),
    ([[1, 1, 1], [1, 1, 1]], dict(pp_size=2, vpp_size=3, vpp_rank=0)),  # (pp, vpp) is not the layout
    ([1, 1], dict(pp_size=2, vpp_size=2, vpp_rank=0)),
    ({"a": 1}, {}),
])
def test_bad_shapes_refused(value, kw):
    with pytest.raises(ConfigValueError, match="recompute"):
        layers_for_value(value, num_layers=4, **kw)


def test_resolve_conflicts_and_merge():
    r = resolve_recompute({"recompute_granularity": "full", "recompute_method": "block",
                           "recompute_num_layers": 2}, {}, num_layers=4)
    assert r["full"] == {0, 1} and r["uniform_chunk"] == 0
    with pytest.raises(ConfigValueError, match="recompute_granularity"):
        resolve_recompute({"recompute_granularity": "full", "recompute_method": "block",
                           "recompute_num_layers": 2}, {"recompute": 3}, num_layers=4)
    r = resolve_recompute({"recompute_granularity": "selective"},
                          {"recompute_config": {"recompute": 1, "select_comm_recompute": True}},
                          num_layers=3)
    assert r["full"] == {0} and r["selective"] == {1, 2} and r["comm"] == {1, 2}
    with pytest.raises(ConfigValueError, match="select_recompute"):
        resolve_recompute({"select_recompute": 1}, {"select_recompute": 2}, num_layers=3)


def test_granularity_forms():
    uniform = resolve_recompute({"recompute_granularity": "full", "recompute_method": "uniform",
                                 "recompute_num_layers": 2}, {}, num_layers=4)
    assert uniform["full"] == {0, 1, 2, 3} and uniform["uniform_chunk"] == 2
    sel = resolve_recompute({"recompute_granularity": "selective"}, {}, num_layers=3)
    assert sel["selective"] == {0, 1, 2} and not sel["full"]
    # full layers need neither selective nor comm recomputation on top
    both = resolve_recompute({"select_recompute": True}, {"recompute": [2], "select_comm_recompute": 3},
                             num_layers=3)
    assert both == {"full": {0, 1}, "selective": {2}, "comm": {2}, "uniform_chunk": 0}
    with pytest.raises(ConfigValueError, match="recompute_method"):
        resolve_recompute({"recompute_granularity": "full"}, {}, num_layers=2)
    with pytest.raises(ConfigValueError, match="recompute_config"):
        resolve_recompute({}, {"recompute_config": {"recompute": 1, "offload": True}}, num_layers=2)
    with pytest.raises(ConfigValueError, match="recompute_config.recompute"):
        resolve_recompute({}, {"recompute": 1, "recompute_config": {"recompute": 2}}, num_layers=2)


def test_check_recompute_shapes_visits_every_stage_and_chunk():
    check_recompute_shapes({"recompute": [[1, 0], [0, 1]]}, pp_size=2, vpp_size=2)
    with pytest.raises(ConfigValueError, match="select_comm_recompute"):
        check_recompute_shapes({"recompute_config": {"select_comm_recompute": [1, 1]}}, pp_size=2,
                               vpp_size=2)
    with pytest.raises(ConfigValueError, match="recompute"):
        check_recompute_shapes({"recompute": [1, 1, 1]}, pp_size=2)
