"""Config of the request forms (issue 13): data.format, data.messages_column, prompt.*, chat.*,
model.chat_template; what would be ignored is refused; Hydra's quoting of template braces."""

from __future__ import annotations

import pytest

from hpcinfer.cli import compose
from hpcinfer.config import validate
from hpcinfer.errors import ConfigError, UserError
from hpcinfer.planning.prompts import request_spec


def test_a_template_with_braces_needs_quotes_on_the_command_line():
    assert compose(["prompt.template='Summarize: {text}'"]).prompt.template == "Summarize: {text}"
    assert compose(['prompt.template="{title}: {text}"']).prompt.template == "{title}: {text}"
    with pytest.raises(UserError):
        compose(["prompt.template=Summarize:{text}"])  # unquoted, Hydra reads the braces as a dict


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.format=xml"], "data.format='xml' is not one of"),
        (["prompt.template='{a}'", "prompt.template_file=/x"], "both set"),
        (["data.messages_column=m", "prompt.template='{a}'"], "prompt.template would be ignored"),
        (["data.messages_column=m", "prompt.chat=true"], "prompt.chat=true would be ignored"),
        (["prompt.system=hi"], "prompt.system='hi' applies only with prompt.chat=true"),
        (["data.format=openai_batch", "data.messages_column=m"], "data.messages_column does not apply to OpenAI Batch"),
        (["data.format=openai_batch", "prompt.template='{a}'"], "prompt.template does not apply to OpenAI Batch"),
        (["data.messages_column=error"], "one of the output columns"),
        (["data=demo_chat", "data.input=/x.parquet"], "data.demo_chat=true"),
    ],
)
def test_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(compose(overrides))


def test_the_request_spec_reads_the_files_it_names(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    (tmp_path / "p.txt").write_text("Q: {question}\nA:")
    spec = request_spec(
        compose(
            [
                f"prompt.template_file={tmp_path / 'p.txt'}",
                "prompt.chat=true",
                f"model.chat_template={tmp_path / 't.jinja'}",
            ]
        ),
        "parquet",
    )
    assert spec.template == "Q: {question}\nA:" and spec.template_columns() == ["question"]
    assert spec.chat_template == "{{ messages }}" and spec.renders_chat
    assert request_spec(compose(["data.messages_column=m"]), "parquet").kind == "messages"
    assert request_spec(compose([]), "openai_batch").kind == "openai_batch"
    with pytest.raises(ConfigError, match="model.chat_template='/nonexistent' cannot be read"):
        request_spec(compose(["model.chat_template=/nonexistent", "data.messages_column=m"]), "parquet")
    with pytest.raises(ConfigError, match="model.chat_template and chat.template_kwargs would be ignored"):
        request_spec(compose([f"model.chat_template={tmp_path / 't.jinja'}", "+chat.template_kwargs.x=1"]), "parquet")
    with pytest.raises(ConfigError, match="positional field"):
        request_spec(compose(["prompt.template='a {} b'"]), "parquet")
    with pytest.raises(ConfigError, match="OpenAI Batch file: prompt.chat does not apply"):
        request_spec(compose(["prompt.chat=true"]), "openai_batch")


def test_the_plan_says_what_a_request_is():
    from dataclasses import replace

    from conftest import bare_plan

    from hpcinfer.planning.render import describe_requests
    from hpcinfer.rundir.records import Plan, RequestSpec

    plan = bare_plan(1)
    assert describe_requests(plan) == "raw prompts from column 'prompt'"
    chat = replace(
        plan, request=RequestSpec(kind="messages", prompt_column=None, messages_column="m", chat_template="T")
    )
    assert (
        describe_requests(chat)
        == "chat conversations in column 'm', rendered with the chat template of model.chat_template"
    )
    batch = replace(plan, request=RequestSpec(kind="openai_batch", prompt_column=None), input_format="openai_batch")
    assert describe_requests(batch).startswith("OpenAI Batch lines") and "converted to Parquet" in describe_requests(
        batch
    )
    back = Plan.from_json(batch.to_json())  # plan.json keeps the request
    assert back.request == batch.request and back.input_format == "openai_batch"


def test_the_messages_column_takes_structs_lists_or_json_text_and_an_all_null_column_reads_as_any():
    import pyarrow as pa

    from hpcinfer.errors import DataError
    from hpcinfer.planning.prompts import check_columns

    cfg = compose(["data.messages_column=m"])
    spec = request_spec(cfg, "parquet")
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    for typ in (pa.list_(turn), pa.large_list(turn), pa.string(), pa.large_string(), pa.null()):
        check_columns(spec, cfg, "x.parquet", pa.schema([("m", typ)]))
    with pytest.raises(DataError, match=r"data.messages_column='m' in 'x.parquet' has type int64; expected a list of"):
        check_columns(spec, cfg, "x.parquet", pa.schema([("m", pa.int64())]))
    with pytest.raises(DataError, match="data.messages_column='m' is not a column of 'x.parquet'"):
        check_columns(spec, cfg, "x.parquet", pa.schema([("prompt", pa.string())]))
