"""Settings the nanoGPT way: --key=value over a script's settings and presets, typed, checked, with clear errors."""
import os

import pytest

import common

DEFAULTS = {"lr": 1e-3, "steps": 10, "resume": False, "guide": "pretrained", "preset": ""}
PRESETS = {"tiny": {"steps": 2, "guide": "random"}}


def test_overrides_keep_types():
    cfg = common.parse_flags(DEFAULTS, ["--lr=3", "--steps=7", "--resume=True", "--guide=some/path.pt"])
    assert cfg == {"lr": 3.0, "steps": 7, "resume": True, "guide": "some/path.pt", "preset": ""}
    assert type(cfg["lr"]) is float
    assert DEFAULTS["steps"] == 10  # the defaults are not modified


def test_preset_then_explicit_flags_win():
    cfg = common.parse_flags(DEFAULTS, ["--steps=5", "--preset=tiny"], PRESETS)
    assert (cfg["steps"], cfg["guide"], cfg["preset"]) == (5, "random", "tiny")


@pytest.mark.parametrize("argv, presets, message", [
    (["--lrr=1"], PRESETS, "unknown config key 'lrr'; valid keys: guide, lr, preset, resume, steps"),
    (["--steps=1.5"], PRESETS, "--steps=1.5: expected a int"),
    (["--resume=maybe"], PRESETS, "--resume=maybe: expected a bool"),
    (["--lr=fast"], PRESETS, "--lr=fast: expected a float"),
    (["steps=3"], PRESETS, "not of the form --key=value"),
    (["--preset=huge"], PRESETS, "unknown preset 'huge'; valid presets: tiny"),
    # A preset is checked like the flags: a stale key, or a value of the wrong type.
    (["--preset=tiny"], {"tiny": {"steps": 2, "stpes": 3}}, "preset 'tiny' sets unknown config keys ['stpes']"),
    (["--preset=tiny"], {"tiny": {"steps": "2"}}, "--steps='2': expected a int"),
])
def test_bad_arguments_name_the_problem(argv, presets, message):
    with pytest.raises(SystemExit) as err:
        common.parse_flags(DEFAULTS, argv, presets)
    assert message in str(err.value.code)


def test_a_script_adds_its_settings_and_changes_shared_defaults():
    cfg = common.configure({"rank": 8, "lr": 0.5}, ["--rank=16", "--order=reverse"])
    assert (cfg.rank, cfg.lr, cfg.order, cfg.align_steps) == (16, 0.5, "reverse", common.SETTINGS["align_steps"])
    assert set(vars(cfg)) == set(common.SETTINGS) | {"rank"}


@pytest.mark.parametrize("argv, checks, message", [
    (["--order=sideways"], None, "--order=sideways: expected one of forward, reverse"),
    (["--batch_size=0"], None, "--batch_size must be positive, got 0"),
    (["--finetune_steps=-1"], None, "--finetune_steps must not be negative, got -1"),
    (["--rank=0"], {"rank": common.positive}, "--rank must be positive, got 0"),
    (["--method=scratch"], None, "--method=scratch: expected one of not, naive, guide"),
    (["--method=guide"], None, "--method=guide trains a guide from scratch: pass --guide=random"),
    (["--eval_only=nowhere.pt"], None, "--eval_only=nowhere.pt: expected 'guide' or the path of a target.pt"),
])
def test_settings_are_checked_once_for_every_script(argv, checks, message):
    with pytest.raises(SystemExit) as err:
        common.configure({"rank": 8}, argv, checks=checks)
    assert message in str(err.value.code)
    # A script's own allowed values replace the shared ones.
    assert common.configure({}, ["--method=scratch"], checks={"method": ("not", "scratch")}).method == "scratch"


@pytest.mark.parametrize("name", ["resnet18_to_mlp", "dinov2_to_patchmlp", "gpt2_to_rnn", "resnet50_to_resnet18"])
def test_help_lists_every_setting_with_its_default_and_comment(tmp_path, name):
    import importlib
    import re
    import textwrap

    from runs import run_script

    script = importlib.import_module(name)
    flag = "-h" if name.startswith(("gpt2", "resnet50")) else "--help"  # each spelling, half the scripts
    proc = run_script(f"{name}.py", ["--preset=tiny", flag], tmp_path)
    assert proc.returncode == 0 and os.listdir(tmp_path) == []  # nothing else ran
    text = proc.stdout
    assert text.startswith(script.__doc__.strip().split("\n\n")[0])
    settings = {**common.SETTINGS, **script.SETTINGS}
    for key, default in settings.items():
        assert re.search(rf"^  --{key}={re.escape(repr(default))}( \(.*\))?$", text, re.MULTILINE), key
    # Comments, read from the source independently: the script's own line for its settings, common.py's else.
    for path, names in ((script.__file__, script.SETTINGS), (common.__file__, common.SETTINGS)):
        source = open(path).read()
        for key in names:
            found = re.search(rf"^    {key}=.*?  # (.*)$", source, re.MULTILINE)
            if found and (path == script.__file__ or key not in script.SETTINGS):
                first = textwrap.wrap(found[1], 116)[0]
                assert f"\n      {first}" in text, key
    assert "--method='not' (one of not, naive" in text and "--batch_size=256 (positive)" in text
    for preset, values in script.PRESETS.items():
        assert f"  {preset}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()) in text
