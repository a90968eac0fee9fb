"""GRPOConfig: the README's command lines, defaults, config files, validation and round trips."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import pytest

from tau2cl.cl.strategies.registry import NEEDS_LORA
from tau2cl.config import (
    CL_ALGORITHMS,
    GROUPS,
    GRPOConfig,
    build_parser,
    load_config_file,
    parse_config,
)
from tau2cl.errors import UserError

# The README's two torchrun command lines (4 GPUs; debug), as passed to `-m tau2cl.train`.
MULTI_GPU_COMMAND = """
    --model_name_or_path Qwen/Qwen2.5-3B-Instruct \\
    --model_dtype bfloat16 \\
    --batch_size_per_gpu 4 \\
    --num_steps_per_task 100 \\
    --cl_algorithm replay \\
    --use_progress_bar \\
    --log_interval 10
"""
DEBUG_COMMAND = """
    --model_name_or_path Qwen/Qwen2.5-3B-Instruct \\
    --verbose \\
    --no-use_progress_bar \\
    --log_interval 1
"""


def command_args(command: str) -> list[str]:
    """The argument list a shell makes of a command written over several `\\`-continued lines."""
    return shlex.split(command.replace("\\\n", " "))


def test_multi_gpu_command_parses_with_its_values():
    config = parse_config(command_args(MULTI_GPU_COMMAND))
    assert config.model_name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert config.model_dtype == "bfloat16"
    assert config.batch_size_per_gpu == 4
    assert config.num_steps_per_task == 100
    assert config.cl_algorithm == "replay"
    assert config.use_progress_bar is True
    assert config.log_interval == 10


def test_debug_command_parses_with_its_values():
    config = parse_config(command_args(DEBUG_COMMAND))
    assert config.model_name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert config.verbose is True
    assert config.use_progress_bar is False
    assert config.log_interval == 1


def test_logging_defaults():
    config = parse_config([])
    assert config.log_interval == 10
    assert config.verbose is False
    assert config.use_progress_bar is None  # a bar when stdout is a terminal
    assert config == GRPOConfig()


def test_every_default_matches_the_documented_value():
    config = GRPOConfig()
    assert config.model_name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert (config.num_samples_per_prompt, config.kl_coef, config.clip_range) == (4, 0.04, 0.2)
    assert config.clip_range_high is None and config.upper_clip_range == 0.2
    assert (config.learning_rate, config.warmup_steps, config.seed) == (1e-6, 10, 42)
    assert config.task_order == ["airline", "retail", "telecom"]
    assert (config.eval_interval, config.eval_temperature, config.save_interval) == (50, 0.0, 0)
    assert config.log_dir == "runs/tau2cl" and config.wandb_project is None
    assert (config.parallelism, config.dist_timeout_minutes) == ("ddp", 30.0)


def test_default_task_order_is_not_shared_between_instances():
    first = GRPOConfig()
    first.task_order.append("x")
    assert GRPOConfig().task_order == ["airline", "retail", "telecom"]


@pytest.mark.parametrize("flag", ["verbose", "use_progress_bar", "gradient_checkpointing"])
def test_boolean_flags_have_exact_positive_and_negative_spellings(flag):
    assert getattr(parse_config([f"--{flag}"]), flag) is True
    assert getattr(parse_config([f"--no-{flag}"]), flag) is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--task_order", "telecom", "airline"],
        ["--task_order", "telecom,airline"],
        ["--task_order", "telecom, airline"],
        ["--task_order=telecom,airline"],
    ],
)
def test_task_order_accepts_spaces_and_commas(argv):
    assert parse_config(argv).task_order == ["telecom", "airline"]


def test_optional_values_accept_none_to_unset():
    config = parse_config(
        ["--clip_range_high", "0.28", "--max_tasks_per_domain", "5", "--wandb_project", "p"]
    )
    assert (config.clip_range_high, config.upper_clip_range) == (0.28, 0.28)
    assert (config.max_tasks_per_domain, config.wandb_project) == (5, "p")
    unset = parse_config(
        ["--clip_range_high", "none", "--max_tasks_per_domain", "None", "--wandb_project", "none"]
    )
    assert (unset.clip_range_high, unset.max_tasks_per_domain, unset.wandb_project) == (None,) * 3


def test_every_cl_algorithm_is_accepted():
    for name in CL_ALGORITHMS:
        lora = ["--lora_r", "8"] if name in NEEDS_LORA else []
        assert parse_config(["--cl_algorithm", name, *lora]).cl_algorithm == name


def test_reward_fn_accepts_an_import_path():
    assert parse_config(["--reward_fn", "my_pkg.rewards:score"]).reward_fn == "my_pkg.rewards:score"


# ----------------------------------------------------------------------------- config files


def test_yaml_config_sets_values_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "cl_algorithm: ewc\n"
        "learning_rate: 1e-5\n"  # YAML reads this as a string: it must still become 1e-5
        "use_progress_bar: false\n"
        "task_order: [retail, airline]\n"
        "log_interval: 7\n"
    )
    config = parse_config(["--config", str(path)])
    assert config.cl_algorithm == "ewc"
    assert config.learning_rate == 1e-5
    assert config.use_progress_bar is False
    assert config.task_order == ["retail", "airline"]
    assert config.log_interval == 7
    overridden = parse_config(
        [
            "--config",
            str(path),
            *"--cl_algorithm replay --use_progress_bar --log_interval 3".split(),
        ]
    )
    assert (overridden.cl_algorithm, overridden.use_progress_bar) == ("replay", True)
    assert overridden.log_interval == 3
    assert overridden.learning_rate == 1e-5  # not given on the command line: the file's value


def test_flags_override_the_config_file_in_either_order(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"batch_size_per_gpu": 8}))
    config = parse_config(["--batch_size_per_gpu", "2", "--config", str(path)])
    assert config.batch_size_per_gpu == 2


def test_json_config_sets_values_and_flags_override_it(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"batch_size_per_gpu": 8, "verbose": True, "eval_max_tasks": 3}))
    config = parse_config(["--config", str(path)])
    assert (config.batch_size_per_gpu, config.verbose, config.eval_max_tasks) == (8, True, 3)
    overridden = parse_config(["--config", str(path), "--no-verbose", "--eval_max_tasks", "none"])
    assert (overridden.batch_size_per_gpu, overridden.verbose) == (8, False)
    assert overridden.eval_max_tasks is None


def test_empty_config_file_sets_nothing(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert parse_config(["--config", str(path)]) == GRPOConfig()


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.yaml", "learning_rate: 1e-6\nbogus_key: 1\nother: 2\n", "'bogus_key', 'other'"),
        ("list.yaml", "- a\n- b\n", "must hold a mapping"),
        ("broken.yaml", "a: [1, 2\n", "is not valid YAML"),
        ("broken.json", "{not json", "is not valid JSON"),
        ("run.toml", "a = 1", "must end in .yaml, .yml or .json"),
        ("typed.yaml", "batch_size_per_gpu: many\n", "--batch_size_per_gpu expects an integer"),
        ("bool.json", '{"verbose": 3}', "--verbose expects true or false"),
        ("order.yaml", "task_order: [airline, 3]\n", "--task_order expects a list of names"),
    ],
)
def test_bad_config_files_are_user_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        parse_config(["--config", str(path)])


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read config file"):
        load_config_file(tmp_path / "absent.yaml")


# ----------------------------------------------------------------------------- validation

BAD_VALUES = [
    (["--model_dtype", "fp8"], "--model_dtype must be one of float32, float16, bfloat16, auto"),
    (
        ["--cl_algorithm", "magic"],
        "--cl_algorithm must be one of sequential, replay, ewc, online_ewc",
    ),
    (["--advantage_normalization", "z"], "--advantage_normalization must be one of std, mean"),
    (["--task_order", "airline", "shopping"], "unknown domain 'shopping' in --task_order"),
    (["--task_order", "airline,retail,airline"], "--task_order lists 'airline' twice"),
    (["--task_order", ","], "--task_order needs at least one domain"),
    (["--num_samples_per_prompt", "1"], "--num_samples_per_prompt must be at least 2"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be at least 1, got 0."),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--num_steps_per_task", "-5"], "--num_steps_per_task must be 0 or more"),
    (["--num_steps_per_task", "0"], "--num_steps_per_task must be at least 1 unless --sft_steps_per_task is set"),
    (["--sft_steps_per_task", "-1"], "--sft_steps_per_task must be 0 or more"),
    (["--eval_split", "dev"], "--eval_split must be one of test, train"),
    (["--heldout_eval"], "--heldout_eval needs --eval_split train"),
    (["--heldout_eval", "--eval_split", "test"], "--heldout_eval needs --eval_split train"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--max_turns", "0"], "--max_turns must be at least 1"),
    (["--max_context_tokens", "0"], "--max_context_tokens must be at least 1"),
    (["--num_updates_per_batch", "0"], "--num_updates_per_batch must be at least 1"),
    (["--eval_samples_per_task", "0"], "--eval_samples_per_task must be at least 1"),
    (["--user_max_turns", "0"], "--user_max_turns must be at least 1"),
    (["--user_max_new_tokens", "0"], "--user_max_new_tokens must be at least 1"),
    (["--user_temperature", "-0.5"], "--user_temperature must be 0 or more"),
    (["--user_max_retries", "-1"], "--user_max_retries must be 0 or more"),
    (["--user_timeout", "0"], "--user_timeout must be greater than 0"),
    (["--user_model", " "], "--user_model must not be empty"),
    (["--user_model", "litellm:"], "--user_model litellm: needs a model name"),
    (["--user_api_base", "http://localhost:8000/v1"], "--user_api_base is only used by a litellm user"),
    (
        ["--user_model", "reference", "--user_api_key", "k"],
        "--user_api_key is only used by a litellm user",
    ),
    (["--log_interval", "0"], "--log_interval must be at least 1"),
    (["--replay_buffer_size", "0"], "--replay_buffer_size must be at least 1"),
    (["--max_tasks_per_domain", "0"], "--max_tasks_per_domain must be at least 1"),
    (["--eval_max_tasks", "0"], "--eval_max_tasks must be at least 1"),
    (["--learning_rate=-1e-6"], "--learning_rate must be 0 or more"),
    (["--kl_coef", "-0.1"], "--kl_coef must be 0 or more"),
    (["--weight_decay", "-0.1"], "--weight_decay must be 0 or more"),
    (["--warmup_steps", "-1"], "--warmup_steps must be 0 or more"),
    (["--eval_interval", "-1"], "--eval_interval must be 0 or more"),
    (["--save_interval", "-1"], "--save_interval must be 0 or more"),
    (["--temperature", "0"], "--temperature must be greater than 0"),
    (["--eval_temperature", "-0.5"], "--eval_temperature must be 0 or more"),
    (["--top_p", "0"], r"--top_p must be in \(0, 1\]"),
    (["--top_p", "1.5"], r"--top_p must be in \(0, 1\]"),
    (["--clip_range", "0"], "--clip_range must be greater than 0"),
    (["--dual_clip", "1"], "--dual_clip must be greater than 1"),
    (["--tis_cap", "0.5"], "--tis_cap must be at least 1"),
    (["--clip_range_high", "-0.2"], "--clip_range_high must be greater than 0"),
    (["--replay_ratio", "1.5"], "--replay_ratio must be between 0 and 1"),
    (["--replay_ratio", "-0.1"], "--replay_ratio must be between 0 and 1"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be greater than 0"),
    (["--parallelism", "zero3"], "--parallelism must be one of ddp, fsdp"),
    (["--dist_timeout_minutes", "0"], "--dist_timeout_minutes must be greater than 0"),
    (
        ["--parallelism", "fsdp", "--cl_algorithm", "online_ewc"],
        "--cl_algorithm online_ewc needs --parallelism ddp",
    ),
    (["--cl_algorithm", "progressive"], "--cl_algorithm progressive needs --lora_r > 0"),
    (["--cl_algorithm", "progressive", "--lora_r", "4", "--progressive_init", "last"], "--progressive_init must be one of"),
    (["--reward_fn", "my_reward"], "--reward_fn must be tau2 or a module:function import path"),
    (["--reward_fn", "pkg:"], "--reward_fn must be tau2 or a module:function import path"),
    (["--model_name_or_path", " "], "--model_name_or_path must not be empty"),
    (["--log_dir", ""], "--log_dir must not be empty"),
    (["--batch_size_per_gpu", "four"], "--batch_size_per_gpu expects an integer, got 'four'"),
    (["--learning_rate", "fast"], "--learning_rate expects a number"),
    (["--learning_rate", "nan"], "--learning_rate expects a number"),
    (["--max_tasks_per_domain", "x"], "--max_tasks_per_domain expects an integer or none"),
    (["--batch_size_per_gpu", "none"], "--batch_size_per_gpu expects an integer"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--verb"], "unrecognized arguments: --verb"),  # no abbreviations: flags are spelled out
    (["--batch_size_per_gpu"], "expected one argument"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES)
def test_bad_values_are_one_sentence_user_errors(argv, message):
    with pytest.raises(UserError, match=message) as caught:
        parse_config(argv)
    text = str(caught.value)
    assert "\n" not in text and text.endswith(".")


def test_direct_construction_is_validated_too():
    with pytest.raises(UserError, match="--num_samples_per_prompt must be at least 2"):
        GRPOConfig(num_samples_per_prompt=1)
    with pytest.raises(UserError, match="--log_interval cannot be none"):
        GRPOConfig(log_interval=None)


# ----------------------------------------------------------------------------- round trips


def test_to_dict_from_dict_round_trip_through_json():
    config = parse_config(
        command_args(MULTI_GPU_COMMAND)
        + ["--task_order", "retail", "telecom", "--clip_range_high", "0.28"]
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert set(data) == {f.name for f in dataclasses.fields(GRPOConfig)}
    assert GRPOConfig.from_dict(data) == config


def test_the_user_api_key_is_in_no_dump_or_repr():
    key = "sk-test-4d2b"
    config = parse_config(["--user_model", "litellm:gpt-4.1-mini", "--user_api_key", key])
    assert config.user_api_key == key  # the run can use it
    assert config.to_dict()["user_api_key"] is None  # summary.json, checkpoints, wandb, train.log
    assert key not in json.dumps(config.to_dict()) and key not in repr(config)


def test_user_options_parse():
    config = parse_config(
        ["--user_model", "litellm:openai/served", "--user_api_base", "http://127.0.0.1:8000/v1"]
        + ["--user_temperature", "0.7", "--user_max_new_tokens", "64", "--user_timeout", "5"]
        + ["--user_max_retries", "0", "--judge_model", "gpt-4o-mini"]
    )
    assert config.user_model == "litellm:openai/served"
    assert (config.user_temperature, config.user_max_new_tokens) == (0.7, 64)
    assert (config.user_timeout, config.user_max_retries, config.judge_model) == (5.0, 0, "gpt-4o-mini")
    assert GRPOConfig().user_model is None  # the scripted user by default


def test_to_dict_copies_lists():
    config = GRPOConfig()
    config.to_dict()["task_order"].append("x")
    assert config.task_order == ["airline", "retail", "telecom"]


def test_from_dict_names_unknown_keys():
    with pytest.raises(UserError, match="unknown config key\\(s\\) 'lr', 'steps'"):
        GRPOConfig.from_dict({"lr": 1.0, "steps": 3, "seed": 1})


# ----------------------------------------------------------------------------- help metadata


def test_every_field_has_help_a_known_group_and_a_flag():
    parser_flags = {opt for action in build_parser()._actions for opt in action.option_strings}
    for f in dataclasses.fields(GRPOConfig):
        assert f.metadata["help"].strip(), f.name
        assert f.metadata["group"] in GROUPS, f.name
        assert f"--{f.name}" in parser_flags, f.name
        for choice in f.metadata.get("choices", ()):
            assert choice in f.metadata["help"], (f.name, choice)


def test_negative_numbers_parse_after_a_space_and_a_misspelled_flag_gets_a_suggestion():
    assert parse_config(["--seed", "-3", "--clip_range", "0.1"]).seed == -3
    with pytest.raises(UserError, match=r"^--learning_rate must be 0 or more, got -1e-05\.$"):
        parse_config(["--learning_rate", "-1e-5"])
    with pytest.raises(UserError, match=r"^unrecognized arguments: --learnig_rate 1e-5; the closest flag is --learning_rate\.$"):
        parse_config(["--learnig_rate", "1e-5"])


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"seed: 1\nlog_dir: caf\xe9\n")
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 20 cannot be read\)"):
        parse_config(["--config", str(path)])


def test_the_importance_cap_defaults_to_two_with_vllm_rollouts_and_zero_turns_it_off():
    assert GRPOConfig().importance_cap is None
    assert GRPOConfig(tis_cap=3.0).importance_cap == 3.0
    assert GRPOConfig(rollout_backend="vllm").importance_cap == 2.0
    assert GRPOConfig(rollout_backend="vllm", tis_cap=0).importance_cap is None
    assert GRPOConfig(rollout_backend="vllm", tis_cap=1.5).importance_cap == 1.5


def test_vllm_settings_that_cannot_work_are_refused_in_one_line():
    with pytest.raises(UserError, match="--rollout_backend vllm needs --top_p 1"):
        GRPOConfig(rollout_backend="vllm", top_p=0.9)
    with pytest.raises(UserError, match="--vllm_sleep_mode needs --rollout_backend vllm"):
        GRPOConfig(vllm_sleep_mode=True)
    with pytest.raises(UserError, match="--vllm_gpu_memory_utilization must be between 0 and 1"):
        GRPOConfig(rollout_backend="vllm", vllm_gpu_memory_utilization=1.5)
    with pytest.raises(UserError, match="--tis_cap must be at least 1"):
        GRPOConfig(tis_cap=0.5)
