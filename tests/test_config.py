"""Config overrides the nanoGPT way: --key=value, typed, with clear errors."""
import pytest

import common

DEFAULTS = {"lr": 1e-3, "steps": 10, "resume": False, "guide": "pretrained", "preset": ""}
PRESETS = {"tiny": {"steps": 2, "guide": "random"}}


def test_overrides_keep_types():
    cfg = common.parse_config(DEFAULTS, ["--lr=3", "--steps=7", "--resume=True", "--guide=some/path.pt"])
    assert cfg == {"lr": 3.0, "steps": 7, "resume": True, "guide": "some/path.pt", "preset": ""}
    assert type(cfg["lr"]) is float
    assert DEFAULTS["steps"] == 10  # the defaults are not modified


def test_preset_then_explicit_flags_win():
    cfg = common.parse_config(DEFAULTS, ["--steps=5", "--preset=tiny"], PRESETS)
    assert (cfg["steps"], cfg["guide"], cfg["preset"]) == (5, "random", "tiny")


@pytest.mark.parametrize("argv, message", [
    (["--lrr=1"], "unknown config key 'lrr'; valid keys: guide, lr, preset, resume, steps"),
    (["--steps=1.5"], "--steps=1.5: expected a int"),
    (["--resume=maybe"], "--resume=maybe: expected a bool"),
    (["--lr=fast"], "--lr=fast: expected a float"),
    (["steps=3"], "not of the form --key=value"),
    (["--preset=huge"], "unknown preset 'huge'; valid presets: tiny"),
])
def test_bad_arguments_name_the_problem(argv, message):
    with pytest.raises(SystemExit) as err:
        common.parse_config(DEFAULTS, argv, PRESETS)
    assert message in str(err.value.code)
