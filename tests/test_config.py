"""Hydra composition of every option, and one-line errors (exit code 2) for bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from omegaconf import open_dict

from conftest import REPO, compose
from prospect.validation import CONF_DIR, ConfigError, check_command_line, group_options, validate

# The seed's options, which must stay; every option of every group (its YAML files) is composed below.
REQUIRED_OPTIONS = {
    "model": ["offline_smollm2", "tiny_random", "smolvlm2_256m", "smolvlm2_500m", "smolvlm2_2b"],
    "strategy": ["none", "full", "drop_all", "drop_middle", "summarize_and_drop"],
    "dataset": ["synthetic", "proassist"],
    "eval": ["proassist", "offline"],
    "logger": ["wandb", "none"],
}
COMPOSED_GROUPS = ("model", "strategy", "dataset", "eval", "logger", "experiment")


def test_every_required_option_exists():
    for group, options in REQUIRED_OPTIONS.items():
        assert set(options) <= set(group_options(group)), group


@pytest.mark.parametrize("group,option", [(g, o) for g in COMPOSED_GROUPS for o in group_options(g)])
def test_every_option_composes_and_validates(group, option, synthetic_root):
    overrides = [f"{group}={option}"]
    if option == "proassist" and group == "dataset":
        overrides += [f"dataset.root={synthetic_root}", "dataset.subset=synthetic", "dataset.annotation=dialog_test_L0_I1"]
    cfg = compose(*overrides)
    validate(cfg)
    if group != "experiment":  # a preset sets other groups; it has no node of its own
        assert cfg[group].name == option


def _compose_with_hydra(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("option", group_options("hydra/launcher"))
def test_every_launcher_composes_and_validates(option):
    from hydra.errors import MissingConfigException

    try:
        cfg = _compose_with_hydra(f"hydra/launcher={option}")
    except MissingConfigException as error:  # a launcher of a plugin that is not installed (slurm: prospect[slurm])
        pytest.skip(f"hydra/launcher={option}: {error}".splitlines()[0])
    assert "." in cfg.hydra.launcher._target_  # the launcher class (tests/test_sweep.py runs them)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)


def test_defaults_are_the_offline_embedded_run():
    cfg = compose()
    assert (cfg.model.name, cfg.strategy.name, cfg.dataset.name, cfg.eval.name) == (
        "offline_smollm2", "drop_middle", "synthetic", "offline"
    )
    assert cfg.strategy.max_seq_len == 4096 and cfg.strategy.reserved_seq_len == 128
    assert cfg.strategy.last_keep_len == 512 and cfg.strategy.position_mode == "original"
    assert cfg.logger.name == "wandb" and cfg.logger.mode is None


def test_strategy_parameter_override_and_shared_keys():
    cfg = compose("strategy=summarize_and_drop", "strategy.max_seq_len=2048", "strategy.position_mode=contiguous")
    assert cfg.strategy.max_seq_len == 2048 and cfg.strategy.position_mode == "contiguous"
    assert cfg.strategy.summary_max_new_tokens == 512
    # every strategy accepts last_keep_len so one sweep can vary it across strategies
    assert compose("strategy=none", "strategy.last_keep_len=256").strategy.last_keep_len == 256


def test_model_options_carry_hub_id_dtype_device_random_init():
    for option in group_options("model"):
        model = compose(f"model={option}").model
        assert {"hub_id", "dtype", "device", "random_init"} <= set(model.keys())
        assert model.device == "auto"
    assert compose("model=smolvlm2_2b").model.hub_id == "HuggingFaceTB/SmolVLM2-2.2B-Instruct"


BAD_COMMAND_LINES = [
    (["strategy=drop_midle"], f"strategy=drop_midle: unknown strategy; choose one of: {', '.join(group_options('strategy'))}"),
    (["model=smolvlm3"], "model=smolvlm3: unknown model"),
    (["-m", "strategy=none,drop_al"], "strategy=drop_al: unknown strategy"),
    (["strategy.last_keep_len=-5"], "strategy.last_keep_len=-5: must be >= 0"),
    (["stream.conversation_batch=0"], "stream.conversation_batch=0: must be auto or an integer >= 1"),
    (["stream.conversation_batch=many"], "stream.conversation_batch='many': must be auto or an integer >= 1"),
    (["stream.optimized=false", "stream.conversation_batch=2"],
     "stream.conversation_batch=2: conversations stream as lanes on the optimized step only (stream.optimized=false); use 1"),
    (["strategy.last_keep_len=4000"], "last_keep_len + reserved_seq_len (4128) must be < max_seq_len (4096)"),
    (["strategy.reserved_seq_len=4096"], "strategy.reserved_seq_len=4096: must be in [0, max_seq_len=4096)"),
    (["strategy.max_seq_len=0"], "strategy.max_seq_len=0: must be >= 1"),
    (["strategy.position_mode=shifted"], "strategy.position_mode=shifted: choose one of: original, contiguous"),
    (["strategy.foo=1"], "strategy.foo=1: unknown key; strategy has: max_seq_len"),
    (["stream.max_new_tokens=0"], "stream.max_new_tokens=0: must be >= 1"),
    (["stream.talk_policy=always"], "stream.talk_policy=always: choose one of: gt_turns, threshold"),
    (["stream.talk_threshold=1.5"], "stream.talk_threshold=1.5: must be in [0.0, 1.0]"),
    (["dataset=proassist"], "dataset.root: not set"),
    (["dataset=proassist", "dataset.root=/nonexistent/proassist"], "dataset.root=/nonexistent/proassist: no such directory"),
    (["dataset.annotation=dialog_val_L0_I1"], "dataset.annotation=dialog_val_L0_I1: the synthetic generator writes"),
    (["dataset.max_videos=0"], "dataset.max_videos=0: must be >= 1"),
    (["model.dtype=fp8"], "model.dtype=fp8: choose one of: auto, float32, bfloat16, float16"),
    (["model=smolvlm2_2b", "model.path=/nonexistent/snapshot"], "model.path=/nonexistent/snapshot: no such directory"),
    (["model=smolvlm2_2b", "model.random_init=true", "model.architecture=huge"], "model.architecture=huge: choose one of"),
    (["eval.window=[1,2]"], "eval.window=[1, 2]: must be null or [left, right] seconds"),
    (["eval.match_threshold=2"], "eval.match_threshold=2: must be in [0.0, 1.0]"),
    (["logger.mode=loud"], "logger.mode=loud: choose one of: null, online, offline, disabled, shared"),
    (["experiment=nothing"], "experiment=nothing: unknown experiment"),
    (["strategy=[a"], "strategy=[a: cannot parse this override"),
    (["strategy._target_=nowhere.Strategy"], "strategy._target_=nowhere.Strategy: cannot import (No module named 'nowhere')"),
    (["dataset.user_types=[]"], "dataset.user_types=[]: must be null or a non-empty list of user types"),
    (["strategy=snapkv", "strategy.window=0"], "strategy.window=0: must be in [1, last_keep_len=512]"),
    (["strategy=snapkv", "strategy.kernel=4"], "strategy.kernel=4: must be an odd integer >= 1"),
    (["strategy=tar_van", "strategy.tar_ratio=2"], "strategy.tar_ratio=2: must be in [0.0, 1.0]"),
    (["strategy=streaming_llm", "strategy.sink_len=-1"], "strategy.sink_len=-1: must be >= 0"),
    (["strategy=key_norm", "strategy.window=1000"], "strategy.window=1000: must be in [0, last_keep_len=512]"),
    (["strategy=snapkv", "strategy.selection=per_token"], "strategy.selection=per_token: choose one of: shared, per_layer, per_head"),
    (["strategy=drop_middle", "strategy.last_keep_len=1.5"], "strategy.last_keep_len=1.5: must be an integer"),
    (["strategy=drop_all", "strategy.last_keep_len=-5"], "strategy.last_keep_len=-5: must be >= 0"),
    (["strategy._target_=prospect.cache.PositionedCache"], "strategy._target_=prospect.cache.PositionedCache: cannot build the strategy"),
    (["+stream.seed=3"], "stream.seed: unknown key; stream has: max_new_tokens"),
    (["stream.top_p=0"], "stream.top_p=0: must be in (0.0, 1.0]"),
    (["stream.compile=sometimes"], "stream.compile=sometimes: choose one of: auto, true, false"),
    (["eval.reference_scores=sometimes"], "eval.reference_scores=sometimes: must be true or false"),
    (["eval=none", "eval.speak_probe=2"], "eval.speak_probe=2: must be true or false"),
    (["+stream.reference_scores=false"], "stream.reference_scores: set it in the eval group: eval.reference_scores"),
    (["dataset.generate.named_user=3"], "dataset.generate.named_user=3: must be true or false"),
    (["model.foo=1"], "model.foo=1: unknown key; model has: name, hub_id, path"),
    (["dataset.foo=1"], "dataset.foo=1: unknown key; dataset has: name, subset, annotation"),
    (["eval.foo=1"], "eval.foo=1: unknown key; eval has: name, sentence_model, match_threshold"),
    (["logger.foo=1"], "logger.foo=1: unknown key; logger has: name, mode, project"),
    (["+summary.foo=1"], "summary.foo: unknown key; summary has: baseline"),
    # a key added with + (or ++) must be declared by the job's YAML files (prospect/declared_keys.py)
    (["+model.foo=1"], "model.foo: unknown key; model has: name, hub_id, path"),
    (["+strategy.foo=1"], "strategy.foo: unknown key; strategy has: max_seq_len, reserved_seq_len, position_mode, last_keep_len, _target_, name"),
    (["strategy=snapkv", "+strategy.windw=3"], "strategy.windw: unknown key (did you mean window?); strategy has: max_seq_len, reserved_seq_len, position_mode, last_keep_len, _target_, name, window, kernel, selection, "),
    (["-m", "strategy=drop_all,snapkv", "+strategy.sumary_prompt=x"], "strategy.sumary_prompt: unknown key (did you mean summary_prompt?); strategy has: max_seq_len"),
    (["+cache_root.x=1"], "cache_root.x: unknown key; cache_root is a value, not a group of keys"),
    (["+model.hub_id.foo=1"], "model.hub_id.foo: unknown key; model.hub_id is a value, not a group of keys"),
    (["~strategy.name"], "strategy.name: missing (deleted with ~?)"),
    (["~model.name"], "model.name: missing (deleted with ~?)"),
    (["~dataset.generate.fps"], "dataset.generate.fps: missing (deleted with ~?)"),
    (["+dataset.foo=1"], "dataset.foo: unknown key; dataset has: name, subset, annotation"),
    (["+dataset.generate.second=9"], "dataset.generate.second: unknown key (did you mean seconds?); dataset.generate has: videos, seconds"),
    (["+eval._target_=os.system"], "eval._target_: unknown key; eval has: name, sentence_model"),
    (["++eval.sentence_modle=x"], "eval.sentence_modle: unknown key (did you mean sentence_model?); eval has: name, sentence_model"),
    (["+logger.foo=1"], "logger.foo: unknown key; logger has: name, mode, project"),
    (["+stream.foo=1"], "stream.foo: unknown key; stream has: max_new_tokens"),
    (["+sed=3"], "sed: unknown key (did you mean seed?); the config has: strategy, stream, seed"),
    (["+paths.cache=/x"], "paths.cache: unknown key (did you mean cache_dir?); paths has: cache_dir"),
    (["-m", "strategy=drop_middle,snapkv", "+strategy.windw=3"], "strategy.windw: unknown key"),
]


@pytest.mark.parametrize("argv,expected", BAD_COMMAND_LINES, ids=[" ".join(a) for a, _ in BAD_COMMAND_LINES])
def test_bad_command_lines_fail_in_one_line(argv, expected):
    with pytest.raises(ConfigError) as raised:
        check_command_line(argv)
    message = str(raised.value)
    assert expected in message
    assert "\n" not in message


def test_missing_subset_and_annotation_name_the_file_and_list_choices(synthetic_root):
    with pytest.raises(ConfigError, match=r"dataset.subset=ego4d: not found in .*available: synthetic"):
        check_command_line(["dataset=proassist", f"dataset.root={synthetic_root}", "dataset.subset=ego4d"])
    with pytest.raises(ConfigError) as raised:
        check_command_line(["dataset=proassist", f"dataset.root={synthetic_root}", "dataset.subset=synthetic"])
    message = str(raised.value)
    assert "dialog-klg_val_L0_I1.jsonl missing" in message
    assert "available: dialog-klg_test_L0_I1, dialog_test_L0_I1" in message


def test_sweep_validates_every_job_before_running():
    # last_keep_len=4000 is fine for none (unused) but not for drop_middle
    check_command_line(["-m", "strategy=none", "strategy.last_keep_len=256,4000"])
    with pytest.raises(ConfigError, match="strategy.last_keep_len=4000"):
        check_command_line(["-m", "strategy=none,drop_middle", "strategy.last_keep_len=256,4000"])


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prospect.run", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_unknown_strategy_exits_2_with_one_line():
    result = _run("strategy=drop_midle")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"prospect: error: strategy=drop_midle: unknown strategy; choose one of: {', '.join(group_options('strategy'))}"
    ]


def test_cli_cfg_job_shows_composed_groups():
    result = _run("--cfg", "job", "strategy=drop_all")
    assert result.returncode == 0, result.stderr
    for group in ("model:", "strategy:", "dataset:", "eval:", "logger:"):
        assert f"\n{group}\n" in f"\n{result.stdout}"
    assert "name: drop_all" in result.stdout


def test_path_values_with_equals_signs_are_quoted_for_hydra():
    from prospect.validation import quote_path_overrides

    job = "/m/2026/0_strategy.last_keep_len=256,strategy=drop_all"
    assert quote_path_overrides([f"predictions={job}/predictions.json", "strategy=drop_all,none", "dataset.root=/a,/b"]) == [
        f"predictions='{job}/predictions.json'", "strategy=drop_all,none", "dataset.root=/a,/b"
    ]
    assert quote_path_overrides(["hydra.run.dir=/tmp/it's=1"]) == ["hydra.run.dir='/tmp/it\\'s=1'"]


USER_STRATEGY = """
from dataclasses import dataclass

from prospect.cache import cache_length
from prospect.context_strategies import BaseContextStrategy


@dataclass
class KeepTail(BaseContextStrategy):
    \"\"\"Keep the initial cache and the last tail_len tokens.\"\"\"

    tail_len: int = 256

    @property
    def name(self) -> str:
        return "keep_tail"

    def handle_overflow(self, past_key_values, last_msg, **context):
        length = cache_length(past_key_values)
        self.keep(past_key_values, [(0, self.init_len), (max(length - self.tail_len, self.init_len), length)])
        return past_key_values, last_msg
"""


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    """A user's strategy outside the repository: one module on the Python path and one YAML in their own
    config folder (selected with hydra.searchpath)."""
    package = tmp_path / "user_strategies"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "keep_tail.py").write_text(textwrap.dedent(USER_STRATEGY))
    conf = tmp_path / "conf"
    (conf / "strategy").mkdir(parents=True)
    (conf / "strategy" / "keep_tail.yaml").write_text("_target_: user_strategies.keep_tail.KeepTail\nname: keep_tail\ntail_len: 128\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return conf


def test_strategy_in_a_config_folder_outside_the_repository(user_conf):
    from prospect.validation import _job_override_lists

    searchpath = f"hydra.searchpath=[file://{user_conf}]"
    check_command_line(["-m", searchpath, "strategy=drop_middle,keep_tail", "summary.baseline=keep_tail"])
    check_command_line([f"hydra.searchpath=[{user_conf}]", "strategy=keep_tail", "strategy.tail_len=64"])
    jobs = _job_override_lists([searchpath, "strategy=glob(*)"], True, search_path=[f"file://{user_conf}"])
    assert [job[-1] for job in jobs] == [f"strategy={name}" for name in sorted([*group_options("strategy"), "keep_tail"])]
    with pytest.raises(ConfigError) as raised:
        check_command_line(["-m", searchpath, "strategy=drop_middle,keep_tale"])
    assert str(raised.value) == (
        f"strategy=keep_tale: unknown strategy; choose one of: {', '.join(sorted([*group_options('strategy'), 'keep_tail']))}")
    with pytest.raises(ConfigError) as raised:  # without the search path it is unknown, as before
        check_command_line(["strategy=keep_tail"])
    assert str(raised.value) == BAD_COMMAND_LINES[0][1].replace("drop_midle", "keep_tail")
    with pytest.raises(ConfigError, match="^strategy.tail_len=x: must be an integer$"):  # the user's class checks its keys
        check_command_line([searchpath, "strategy=keep_tail", "strategy.tail_len=x"])
    with pytest.raises(ConfigError, match=r"must be a list of folders, e\.g\. hydra\.searchpath=\[file:///a,/b\]$"):
        check_command_line([f"hydra.searchpath={user_conf}", "strategy=keep_tail"])
    # a key of the class that its YAML leaves to the default can be added with +; any other key cannot
    (user_conf / "strategy" / "keep_tail_bare.yaml").write_text("_target_: user_strategies.keep_tail.KeepTail\nname: keep_tail\n")
    check_command_line([searchpath, "strategy=keep_tail_bare", "+strategy.tail_len=64"])
    with pytest.raises(ConfigError, match=r"^strategy.tail_lenn: unknown key \(did you mean tail_len\?\); strategy has: .*, tail_len$"):
        check_command_line([searchpath, "strategy=keep_tail_bare", "+strategy.tail_lenn=64"])


def test_a_presets_keys_must_be_declared_by_an_option_of_their_group(tmp_path):
    """An experiment preset declares no key: what it sets in a group must be a key of one of the group's options
    (zoo_embedded sets summarize_and_drop's summary_max_new_tokens for every strategy it sweeps), so a typo in a
    preset is refused like one on the command line; a strategy key is also one of its class's fields."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("# @package _global_\nstrategy:\n  summary_max_new_tokens: 8\n  window: 16\n")
    (conf / "typo.yaml").write_text("# @package _global_\neval:\n  match_treshold: 0.3\n")
    (conf / "nested_typo.yaml").write_text("# @package _global_\ndataset:\n  generate:\n    video: 3\n")
    (conf / "new_top.yaml").write_text("# @package _global_\nnotes: hello\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    check_command_line(["-m", searchpath, "experiment=mine", "strategy=drop_middle,summarize_and_drop,snapkv"])
    check_command_line(["experiment=zoo_embedded", "strategy=drop_all"])
    # another strategy's key: one sweep over several strategies sets summarize_and_drop's, and each of its jobs
    # passes alone too (the gpu_pool launcher starts every job as its own command)
    check_command_line(["-m", "strategy=drop_middle,summarize_and_drop", "++strategy.summary_max_new_tokens=128"])
    check_command_line(["strategy=drop_middle", "++strategy.summary_max_new_tokens=128"])
    expected = {
        "typo": "eval.match_treshold: unknown key (did you mean match_threshold?); eval has: name, sentence_model",
        "nested_typo": "dataset.generate.video: unknown key (did you mean videos?); dataset.generate has: videos, seconds",
        "new_top": "notes: unknown key; the config has: strategy, stream, seed",
    }
    for preset, message in expected.items():
        with pytest.raises(ConfigError) as raised:
            check_command_line([searchpath, f"experiment={preset}"])
        assert str(raised.value).startswith(message)


def test_the_zoo_presets_sweep_the_registered_strategies():
    """One source: experiment=strategy_zoo sweeps the bounded strategies the bench times, zoo_embedded all of them."""
    from prospect.context_strategies import STRATEGIES, zoo_strategies
    from prospect.validation import _job_override_lists

    def swept(preset: str) -> set[str]:
        jobs = _job_override_lists([f"experiment={preset}"], True)
        return {override.split("=", 1)[1] for job in jobs for override in job if override.startswith("strategy=")}

    assert swept("strategy_zoo") == set(zoo_strategies()) == set(STRATEGIES) - {"full"}
    assert swept("zoo_embedded") == set(STRATEGIES)


def test_prospect_launchers_are_found_from_their_config(tmp_path):
    """run.py keeps no list: every conf/hydra/launcher YAML whose _target_ is hydra_plugins.prospect_NAME.Class is
    served by prospect.sweep.NAME, registered with Hydra under that name; other launchers' YAMLs are left to Hydra."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    from prospect.sweep import register_launchers

    assert register_launchers() == ["prospect.sweep.fused", "prospect.sweep.gpu_pool"]
    for target in ("hydra_plugins.prospect_fused.FusedLauncher", "hydra_plugins.prospect_gpu_pool.GpuPoolLauncher"):
        assert issubclass(Plugins.instance().class_name_to_class[target], Launcher)
    conf = tmp_path / "hydra" / "launcher"
    conf.mkdir(parents=True)
    (conf / "pool_copy.yaml").write_text("_target_: hydra_plugins.prospect_gpu_pool.GpuPoolLauncher\njobs_per_gpu: 2\n")
    (conf / "other.yaml").write_text("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher\n")
    assert register_launchers(tmp_path) == ["prospect.sweep.gpu_pool"]


def test_a_launcher_yaml_naming_no_prospect_module_is_one_line(tmp_path):
    from prospect.sweep import register_launchers

    conf = tmp_path / "hydra" / "launcher"
    conf.mkdir(parents=True)
    (conf / "nope.yaml").write_text("_target_: hydra_plugins.prospect_nope.NopeLauncher\n")
    with pytest.raises(ConfigError, match=r"nope.yaml: _target_=hydra_plugins.prospect_nope.NopeLauncher: no launcher module "
                                          r"prospect.sweep.nope serves it"):
        register_launchers(tmp_path)
