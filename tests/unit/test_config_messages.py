"""What `load_config` says about a config it cannot use: each message names the file or the dotted
field and what was expected (an empty file, a misspelt key, YAML that does not parse, a name from a
fixed set), and the CLI turns it into `error:` lines and exit code 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from actors.commands.cli import app
from rlhf_cluster.config import ConfigError, load_config


def refusal(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


@pytest.mark.parametrize("text", ["", "\n", "  \n\t\n"], ids=["empty", "blank", "whitespace"])
def test_an_empty_config_file_is_refused_naming_it(text, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert refusal(path).startswith(f"config file {path} is empty: expected a mapping of sections")
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code == 2 and f"error: config file {path} is empty" in result.output, result.output
    assert "dry run ok" not in result.output


def test_an_explicit_empty_mapping_still_means_the_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert load_config(path).train.total_steps == load_config(None).train.total_steps


def test_a_yaml_error_names_the_config_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  total_steps: 5\n  prompts_per_step: [1\n")
    message = refusal(path)
    assert message.startswith(f"config file {path} is not valid YAML: while parsing a flow sequence")
    assert f'in "{path}", line 3, column 21' in message and "<unicode string>" not in message


def test_an_override_that_is_no_yaml_is_refused_naming_it():
    message = refusal(overrides=["train.total_steps={a"])
    assert message.startswith("override 'train.total_steps={a': the value is not valid YAML")
    assert 'in "--set train.total_steps={a", line 1, column 3' in message and "<unicode string>" not in message
    result = CliRunner().invoke(app, ["train", "--set", "train.total_steps={a", "--dry-run"])
    assert result.exit_code == 2 and "error: override 'train.total_steps={a'" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("generation.samplng=3",
         "generation.samplng: Extra inputs are not permitted (no such field; did you mean 'sampling'?)"),
        ("generaton=1", "generaton: Extra inputs are not permitted (no such field; did you mean 'generation'?)"),
        ("generation.sampling.temprature=1", "generation.sampling.temprature: Extra inputs are not permitted "
         "(no such field; did you mean 'temperature'?)"),
        ("learner.backend={type: deepspeed, zero_stagx: 2}", "learner.backend.zero_stagx: Extra inputs are not "
         "permitted (no such field; did you mean 'zero_stage'?)"),
        ("scoring.rewards=[verifier, {type: function, function: 'a:b', wieght: 2}]", "scoring.rewards[1].wieght: Extra "
         "inputs are not permitted (no such field; did you mean 'weight'?)"),
        ("scoring.rewards=[{type: model, models: [{path: x, nmae: y}]}]", "scoring.rewards[0].models[0].nmae: Extra "
         "inputs are not permitted (no such field; did you mean 'name'?)"),
        ("generation.sampling.zzzz=1", "generation.sampling.zzzz: Extra inputs are not permitted (no such field; "
         "generation.sampling has: n, temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, ignore_eos)"),
        ("learner.backend={type: fsdp2, config_file: x}", "learner.backend.config_file: Extra inputs are not permitted "
         "(no such field; learner.backend (fsdp2) has: type; config_file is deepspeed's: set learner.backend.type to "
         "it)"),
    ],
    ids=["section", "top_level", "nested", "typed_union", "list_item", "list_in_list", "no_close_name", "union_kind"],
)
def test_a_misspelt_key_gets_the_nearest_field_or_the_sections_fields(override, line):
    assert f"\n  {line}" in refusal(overrides=[override])


def test_an_unknown_top_level_key_lists_the_sections(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("zzzz: 1\ntrain:\n  total_stepz: 3\n")
    message = refusal(path)
    assert message.startswith(f"invalid config {path}:")
    top = "\n  zzzz: Extra inputs are not permitted (no such field; the top level has: name, run_dir, seed, model, "
    assert top in message
    typo = "\n  train.total_stepz: Extra inputs are not permitted (no such field; did you mean 'total_steps' or 'total_epochs'?)"
    assert typo in message


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("generation.sampling={n:2}", "generation.sampling.n:2: Extra inputs are not permitted (no such field; YAML "
         "read 'n:2' as a key with no value: in a flow mapping `key: value` needs a space after the colon ({n: 2}))"),
        ("generation.sampling=n:2", "generation.sampling: Input should be a valid dictionary or instance of "
         "SamplingConfig (YAML read 'n:2' as one string: `key: value` needs a space after the colon (n: 2))"),
        ("learner.backend={type:deepspeed}", "learner.backend: Value error, needs a `type`: one of fsdp2, deepspeed; "
         "YAML read 'type:deepspeed' as a key with no value: in a flow mapping `key: value` needs a space after the "
         "colon ({type: deepspeed})"),
        ("scoring.rewards=[{type:function, function: 'm:f'}]", "scoring.rewards[0]: Value error, needs a `type`: one "
         "of verifier, function, model, judge; YAML read 'type:function' as a key"),
    ],
    ids=["flow_key", "string", "typed_union_key", "list_item"],
)
def test_a_colon_without_its_space_is_explained(override, line):
    assert f"\n  {line}" in refusal(overrides=[override])


def test_a_colon_without_its_space_in_a_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("generation:\n  sampling: {n:2, temperature: 0.5}\n")
    assert "generation.sampling.n:2: Extra inputs are not permitted (no such field; YAML read 'n:2'" in refusal(
        path)
    # The same value with the space, and a colon inside a string value, load as before.
    assert load_config(None, ["generation.sampling={n: 2}"]).generation.sampling.n == 2
    assert load_config(None, ["generation.environment=my_envs:Sokoban"]).generation.environment == "my_envs:Sokoban"


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("generation.environment={type: foo}", "generation.environment: Value error, expected the name of a built-in "
         "environment (tools, tools_rewarded, scripted) or 'module:Class' of your own, e.g. `environment: tools`; "
         "got a mapping"),
        ("generation.environment=3", "generation.environment: Value error, expected the name of a built-in environment "
         "(tools, tools_rewarded, scripted) or 'module:Class' of your own, e.g. `environment: tools` (got 3)"),
        ("learner.backend=3", "learner.backend: Value error, expected one of fsdp2, deepspeed, or a mapping with "
         "`type`: one of them (got 3)"),
        ("scoring.rewards=[[verifier]]", "scoring.rewards[0]: Value error, expected one of verifier, function, model, "
         "judge, or a mapping with `type`: one of them (got ['verifier'])"),
        # Already listed by pydantic: a fixed set (Literal) and an unknown `type` of a typed union.
        ("generation.mode={type: batched}", "generation.mode: Input should be 'streaming' or 'batched'"),
        ("learner.backend={type: foo}", "learner.backend: Input tag 'foo' found using 'type' does not match any of the "
         "expected tags: 'fsdp2', 'deepspeed'"),
    ],
    ids=["environment_mapping", "environment_number", "union_number", "union_list", "literal", "union_tag"],
)
def test_a_name_from_a_fixed_set_lists_the_names(override, line):
    assert f"\n  {line}" in refusal(overrides=[override])


def test_the_environment_names_listed_are_the_built_in_ones():
    from rlhf_cluster.generation.environments import BUILT_IN

    message = refusal(overrides=["generation.environment={type: foo}"])
    assert f"({', '.join(BUILT_IN)})" in message
    for name in BUILT_IN:
        assert load_config(None, [f"generation.environment={name}"]).generation.environment == name


def test_a_typed_unions_mapping_without_its_type_says_which_kind_its_keys_fit():
    """Trial 23a M5: `--set learner.backend.zero_stage=2` on a config without a backend, or `typ:`,
    said only "needs a `type`"; the message names what the mapping has and the kind it fits."""
    fit = refusal(overrides=["learner.backend={zero_stage: 2}"])
    assert "needs a `type`: one of fsdp2, deepspeed; zero_stage is deepspeed's: {type: deepspeed, zero_stage: 2}" in fit
    typo = refusal(overrides=["weights.transport={typ: direct}"])
    assert "needs a `type`: one of filesystem, direct, collective; it has 'typ': did you mean 'type'?" in typo
    assert refusal(overrides=["learner.lr=-1"]).startswith("invalid config <defaults> with --set learner.lr=-1:\n")


def test_every_typed_unions_kinds_are_left_out_of_error_paths():
    """Trial 23a M6: the judge's kind was missing from `_UNION_TAGS`, so a misspelt judge field read
    `scoring.rewards[0].judge.temprature`. Every discriminated union of the config, by its field's
    name and its kinds, from the config's own schema."""
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.config.loading import _UNION_TAGS

    unions: dict[str, set[str]] = {}

    def walk(node, name=None):
        if isinstance(node, dict):
            if "discriminator" in node and name:
                unions.setdefault(name, set()).update(node["discriminator"]["mapping"])
            for key, value in node.items():
                if key == "properties":
                    for field, sub in value.items():
                        walk(sub, field)
                elif key == "$defs":
                    for sub in value.values():
                        walk(sub)
                elif key in ("items", "anyOf", "oneOf", "allOf"):
                    for sub in value if isinstance(value, list) else [value]:
                        walk(sub, name)

    walk(JobConfig.model_json_schema())
    assert set(unions) == {"backend", "transport", "rewards"} and unions == _UNION_TAGS
    judge = "scoring.rewards=[{type: judge, model: /j, temprature: 0}]"
    assert "\n  scoring.rewards[0].temprature: Extra inputs are not permitted" in refusal(overrides=[judge])


def test_an_override_names_a_list_item_by_its_index(tmp_path):
    """Trial 23a M3: `--set` could not reach into a list (`scoring.rewards[0].weight`, Hydra's
    `scoring.rewards.0.weight`), and the errors did not say so. Both spellings index a list the file
    sets (a bare kind's name becomes its mapping); one the file does not set, a missing index or a
    field on the list itself is refused naming it."""
    from rlhf_cluster.config import load_config

    path = tmp_path / "rewards.yaml"
    path.write_text("scoring:\n  rewards: [verifier, {type: model, models: [{path: /rm, name: a}]}]\n")
    cfg = load_config(path, ["scoring.rewards.0.weight=0.5", "scoring.rewards[1].models[0].name=b"])
    assert cfg.scoring.rewards[0].weight == 0.5 and cfg.scoring.rewards[1].models[0].name == "b"
    assert refusal(path, ["scoring.rewards.2.weight=1"]) == (
        "override 'scoring.rewards.2.weight': scoring.rewards has 2 item(s), no [2]"
    )
    assert refusal(path, ["scoring.rewards.weight=1"]) == (
        "override 'scoring.rewards.weight': scoring.rewards is a list; name an item by its index (scoring.rewards[0])"
    )
    assert refusal(None, ["scoring.rewards.0.weight=1"]).startswith(
        "override 'scoring.rewards.0.weight': scoring.rewards is not a list the config file sets"
    )


def test_an_exponent_without_a_dot_is_a_number_in_a_file_and_an_override(tmp_path):
    """Trial 23a M7: YAML 1.1 (PyYAML) read `1e-5` as a string: coerced where the field is a float,
    but it reached `generation.engine_kwargs` and `data.chat_template_kwargs` as the string."""
    from rlhf_cluster.config import load_config

    path = tmp_path / "lr.yaml"
    path.write_text("learner: {lr: 3e-6}\ngeneration: {engine_kwargs: {swap_space: 2E+0}}\n")
    cfg = load_config(path, ["data.chat_template=true", "data.chat_template_kwargs={scale: -1e-5, name: v1e5}"])
    assert cfg.learner.lr == 3e-6 and cfg.generation.engine_kwargs == {"swap_space": 2.0}
    assert cfg.data.chat_template_kwargs == {"scale": -1e-5, "name": "v1e5"}
