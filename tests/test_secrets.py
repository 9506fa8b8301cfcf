"""Safe run directories: private (0700) and free of secrets.

A secret (a config value under a secret-looking name such as engine.hf_token, or the value of a
secret-named environment variable such as HF_TOKEN) never lands in config.yaml: a value that an
environment variable holds is saved as `${oc.env:NAME,***}` and resolved again wherever the run
reads its config; any other secret-named value is refused before anything is written.
"""

from __future__ import annotations

import os
import stat

import pytest

from hpcinfer.cli import compose
from hpcinfer.config import engine_args, load_run_config, to_yaml, validate
from hpcinfer.errors import ConfigError
from hpcinfer.rundir.files import atomic_write
from hpcinfer.rundir.paths import RunDir
from hpcinfer.secrets import looks_secret, redact, secret_config_keys
from hpcinfer.submit import config_differences

TOKEN = "hf_Zx81kQ0pLm3vN7rT"


# ---- names -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "WANDB_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "GITHUB_TOKEN",
        "hf_token",
        "DB_PASSWORD",
        "ftp_passwd",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "ssh_private_key",
        "apiKey",
        "HFTOKEN",
        "client-secret",
        "OPENAI_APIKEY",
        "Credential",
    ],
)
def test_secret_names(name):
    assert looks_secret(name)


@pytest.mark.parametrize(
    "name",
    [
        "max_tokens",
        "tokenizer",
        "tokenizer_mode",
        "TOKENIZERS_PARALLELISM",
        "max_num_batched_tokens",
        "PATH",
        "HOME",
        "SSH_AUTH_SOCK",
        "KEY",
        "keyboard",
        "monkey",
        "sbatch",
        "prompt_column",
    ],
)
def test_ordinary_names(name):
    assert not looks_secret(name)


# ---- redact ------------------------------------------------------------------------------------
ENV = {
    "HF_TOKEN": TOKEN,
    "WANDB_API_KEY": "0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "a+b/c.d*e(f)g[h]",
    "SHORT_TOKEN": "abc1234",
    "HOME": "/home/someone",
    "EMPTY_PASSWORD": "",
    "TOKENIZERS_PARALLELISM": "false",
}


def test_redact_replaces_every_secret_value():
    text = f"token={TOKEN} wandb=0123456789abcdef again {TOKEN} aws=a+b/c.d*e(f)g[h]"
    assert redact(text, ENV) == "token=*** wandb=*** again *** aws=***"


def test_redact_leaves_short_and_non_secret_values():
    text = "abc1234 in /home/someone, false"
    assert redact(text, ENV) == text


def test_redact_longest_value_first():
    env = {"A_TOKEN": "abcdefgh", "B_TOKEN": "abcdefgh-longer"}
    assert redact("x abcdefgh-longer y abcdefgh", env) == "x *** y ***"


def test_redact_is_pure_and_handles_nothing_to_hide():
    assert redact("nothing here", {}) == "nothing here"
    assert redact("", ENV) == ""
    env = dict(ENV)
    redact(TOKEN, env)
    assert env == ENV


# ---- secret config keys ------------------------------------------------------------------------
def test_secret_config_keys_by_name_and_string_value():
    cfg = {
        "engine": {"hf_token": TOKEN, "max_model_len": 64, "tokenizer": "/models/tok", "hf_token2": None},
        "sampling": {"max_tokens": 16, "stop": ["a"]},
        "extra": {"bos_token_id": 1, "use_token": True, "api_keys": ["k1", "k2"], "db": {"password": "pw"}},
        "credentials": {"user": "me"},
    }
    assert secret_config_keys(cfg) == ["credentials.user", "engine.hf_token", "extra.api_keys", "extra.db.password"]


def test_default_config_has_no_secret_keys():
    from omegaconf import OmegaConf

    for overrides in ([], ["cluster=slurm"], ["model=tiny_moe"], ["model=llama"]):
        assert secret_config_keys(OmegaConf.to_container(OmegaConf.structured(compose(overrides)))) == []


# ---- config.yaml: to_yaml / load_run_config ------------------------------------------------------
@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


def _round_trip(cfg, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    return path.read_text(), load_run_config(path)


def test_secret_from_the_environment_is_saved_as_a_reference(token_env, tmp_path, capsys):
    cfg = compose(["+engine.hf_token=${oc.env:HF_TOKEN}"])
    assert cfg.engine["hf_token"] == TOKEN
    validate(cfg)
    text, loaded = _round_trip(cfg, tmp_path)
    assert TOKEN not in text
    assert "hf_token: ${oc.env:HF_TOKEN,***}" in text
    assert loaded.engine["hf_token"] == TOKEN  # the ranks get the real value back
    assert engine_args(loaded, "m")["hf_token"] == TOKEN
    assert config_differences(loaded, cfg) == []  # resuming the run is allowed
    assert capsys.readouterr().err == ""


def test_literal_value_equal_to_an_environment_variable_is_saved_as_a_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_HUB_CREDS", TOKEN)  # any variable: the key's name says it is secret
    cfg = compose([f"+engine.hf_token={TOKEN}"])
    validate(cfg)
    text, loaded = _round_trip(cfg, tmp_path)
    assert TOKEN not in text and "${oc.env:MY_HUB_CREDS,***}" in text
    assert loaded.engine["hf_token"] == TOKEN


def test_resume_reads_the_secret_back_and_validates(token_env, tmp_path):
    from hpcinfer.resume import saved_config
    from hpcinfer.rundir.paths import RunDir

    rd = RunDir(tmp_path / "run")
    rd.create()
    atomic_write(rd.config, to_yaml(compose(["+engine.hf_token=${oc.env:HF_TOKEN}"])))
    cfg = saved_config(str(rd.path), ["rank_retries=2"])
    assert cfg.engine["hf_token"] == TOKEN
    validate(cfg)


def test_saved_reference_reads_as_mask_where_the_variable_is_unset(token_env, tmp_path, monkeypatch):
    """status or finalize run from another shell still read the config."""
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(compose([f"+engine.hf_token={TOKEN}"])))
    monkeypatch.delenv("HF_TOKEN")
    assert load_run_config(path).engine["hf_token"] == "***"


def test_secret_environment_value_inside_another_value_is_saved_as_a_reference(token_env, tmp_path):
    cfg = compose(["cluster=slurm", f"cluster.setup=['export HF_TOKEN={TOKEN}', 'module load cuda']"])
    validate(cfg)
    text, loaded = _round_trip(cfg, tmp_path)
    assert TOKEN not in text
    assert loaded.cluster.setup == [f"export HF_TOKEN={TOKEN}", "module load cuda"]


def test_literal_secret_is_refused_without_showing_it():
    cfg = compose([f"+engine.hf_token={TOKEN}"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, env={})
    msg = str(e.value)
    assert "engine.hf_token" in msg and "${oc.env:" in msg and TOKEN not in msg


def test_to_yaml_masks_a_literal_secret_and_warns(tmp_path, capsys):
    cfg = compose([f"+engine.hf_token={TOKEN}"])
    text = to_yaml(cfg, env={})
    assert TOKEN not in text and "hf_token: '***'" in text
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "engine.hf_token" in err[0] and "cannot be reproduced" in err[0] and TOKEN not in err[0]


def test_to_yaml_without_secrets_is_unchanged_and_round_trips(tmp_path):
    from omegaconf import OmegaConf

    cfg = compose(["cluster=slurm", "+cluster.sbatch.mail-type=END", "sampling.stop=['###']"])
    assert to_yaml(cfg, env=ENV) == OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert config_differences(_round_trip(cfg, tmp_path)[1], cfg) == []


def test_cli_refuses_a_literal_secret(hpcinfer):
    proc = hpcinfer("plan", f"+engine.hf_token={TOKEN}")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "engine.hf_token" in proc.stderr and TOKEN not in proc.stderr + proc.stdout


# ---- private run directories -------------------------------------------------------------------
def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0)  # the most permissive umask: modes must not rely on the user's
    yield
    os.umask(old)


def test_run_dir_and_its_subdirectories_are_private(tmp_path, open_umask):
    rd = RunDir(tmp_path / "outputs" / "day" / "run")
    rd.create()
    for d in (rd.path, rd.shards_dir, rd.done_dir, rd.ranks_dir, rd.logs_dir):
        assert _mode(d) == 0o700, d


def test_existing_empty_run_dir_becomes_private(tmp_path, open_umask):
    given = tmp_path / "mine"
    given.mkdir(mode=0o777)
    assert _mode(given) == 0o777
    RunDir(given).create()
    assert _mode(given) == 0o700


def test_files_written_into_a_run_dir_are_private(tmp_path, open_umask):
    import pyarrow as pa

    from hpcinfer.rundir.manifest import Shard, write_manifest

    rd = RunDir(tmp_path / "run")
    rd.create()
    atomic_write(rd.config, "x: 1\n")
    write_manifest(str(rd.manifest), [Shard(0, 0, "/in.parquet", 0, 1, 0)], pa.schema([("prompt", pa.string())]))
    with rd.locked():
        pass
    for f in (rd.config, rd.manifest, rd.lock_file):
        assert _mode(f) == 0o600, f
