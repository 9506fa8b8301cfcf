"""Keeping secrets (tokens, passwords, API keys) out of what hpcinfer writes. Pure.

What counts as secret is decided by NAME, word by word, so that `HF_TOKEN`, `hf_token`,
`WANDB_API_KEY`, `AWS_SECRET_ACCESS_KEY` or `dbPassword` are secret but `max_tokens`, `tokenizer`
and `TOKENIZERS_PARALLELISM` are not (a plain substring test would hit those).

- `redact(text, env)`: the values (8 characters or more) of secret-named environment variables
  in `text` become `***` (for logs, messages, any dump).
- `secret_config_keys(cfg)`: the keys of a config whose name (or a parent's) looks secret and
  whose value is a string, e.g. `engine.hf_token`.
- `env_references(cfg, env)`: the config as it may be saved (config.yaml): every secret value
  that some environment variable holds becomes `${oc.env:NAME,***}`, which OmegaConf resolves
  again wherever the run reads its config (the ranks inherit the submitting environment), and
  to `***` where that variable is not set (e.g. `status` from another shell); a secret-named
  value that no environment variable holds becomes `***` and is reported as lost.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Tuple

MASK = "***"
MIN_SECRET_LEN = 8  # shorter environment values are not replaced in text (too many false hits)

_SECRET_WORDS = (
    "TOKEN",
    "SECRET",
    "SECRETS",
    "PASSWORD",
    "PASSWORDS",
    "PASSWD",
    "CREDENTIAL",
    "CREDENTIALS",
    "APIKEY",
    "ACCESSKEY",
    "PRIVATEKEY",
)  # a word equal to or ending in one: HFTOKEN too
_KEY_PREFIXES = ("API", "ACCESS", "PRIVATE")  # ... followed by the word KEY: API_KEY, AccessKey


def words(name: str) -> List[str]:
    """`hf_token` -> [HF, TOKEN]; `dbPassword` -> [DB, PASSWORD]; `AWS_SECRET_ACCESS_KEY` -> 4 words."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    return [w.upper() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def looks_secret(name: str) -> bool:
    ws = words(name)
    return any(w.endswith(s) for w in ws for s in _SECRET_WORDS) or any(
        a in _KEY_PREFIXES and b in ("KEY", "KEYS") for a, b in zip(ws, ws[1:])
    )


def secret_env_values(env: Mapping[str, str]) -> Dict[str, str]:
    """value -> name of every secret-named environment variable with a value worth hiding."""
    return {v: k for k, v in sorted(env.items()) if looks_secret(k) and len(v) >= MIN_SECRET_LEN}


def redact(text: str, env: Mapping[str, str]) -> str:
    """`text` with every secret environment value replaced by `***`."""
    return _substitute(text, secret_env_values(env), lambda name: MASK)


def secret_config_keys(cfg: Mapping[str, Any]) -> List[str]:
    """Dotted keys of string values under a secret-looking name, e.g. ['engine.hf_token']."""
    found: List[str] = []
    _walk(cfg, lambda path, v: found.append(".".join(path)) if _is_secret_value(path, v) else None)
    return sorted(set(found))


def env_references(cfg: Mapping[str, Any], env: Mapping[str, str]) -> Tuple[Dict[str, Any], List[str]]:
    """(a copy of `cfg` fit to be written, keys of secret values that could not be kept), see above."""
    env_values = secret_env_values(env)
    by_value: Dict[str, str] = {}  # any variable may hold a secret key's value: secret-named ones first
    for name, value in sorted(env.items(), key=lambda kv: (not looks_secret(kv[0]), kv[0])):
        by_value.setdefault(value, name)
    lost: List[str] = []

    def keep_out(path: Tuple[str, ...], value: Any) -> Any:
        if _is_secret_value(path, value):
            if value in by_value:
                return _reference(by_value[value])
            lost.append(".".join(path))
            return MASK
        return _substitute(value, env_values, _reference) if isinstance(value, str) else value

    return _walk(cfg, keep_out), sorted(set(lost))


def _reference(name: str) -> str:
    return "${oc.env:" + name + "," + MASK + "}"


def _is_secret_value(path: Tuple[str, ...], value: Any) -> bool:
    return isinstance(value, str) and bool(value) and any(looks_secret(p) for p in path)


def _substitute(text: str, values: Dict[str, str], replacement: Callable[[str], str]) -> str:
    """Replace each of `values` (value -> name) in one pass, longest first."""
    if not values:
        return text
    pattern = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.sub(pattern, lambda m: replacement(values[m.group(0)]), text)


def _walk(obj: Any, fn: Callable[[Tuple[str, ...], Any], Any], path: Tuple[str, ...] = ()) -> Any:
    """A copy of nested dicts/lists with fn(path, leaf) applied to every leaf (list items keep
    their parent's path)."""
    if isinstance(obj, Mapping):
        return {k: _walk(v, fn, path + (str(k),)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_walk(v, fn, path) for v in obj]
    return fn(path, obj)
