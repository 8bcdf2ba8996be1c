"""Load teacher and student the way users name them: a hub id, a local directory or `embedded:NAME`."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import BadInput

EMBEDDED_PREFIX = "embedded:"


def resolve_model_source(name: str) -> str:
    """A loadable path or hub id; `embedded:NAME` maps to the packaged model, a missing local path is an error."""
    if name.startswith(EMBEDDED_PREFIX):
        from ..assets import EMBEDDED_MODELS, embedded_model_path

        short = name[len(EMBEDDED_PREFIX):]
        if short not in EMBEDDED_MODELS:
            raise BadInput(f"unknown embedded model {name!r}; embedded models: "
                           + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS))
        return str(embedded_model_path(short))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInput(f"model path {name} is a file, expected a directory written by save_pretrained")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise BadInput(f"model path {name}: no such directory")
    _check_hub_reachable(name)
    return name  # a hub id


HUB_CONNECT_TIMEOUT_S = 10
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _check_hub_reachable(repo_id: str) -> None:
    """A hub model that is not cached needs the hub: say so in a moment, not after a minute of retries.

    Skipped offline (transformers then fails at once), for a cached model, and behind a proxy (where a
    direct connection proves nothing).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except Exception:  # an id the cache cannot even parse: transformers names the problem
        return
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise BadInput(f"cannot load {repo_id!r}: the hub at {constants.ENDPOINT} cannot be reached "
                       f"({exc.strerror or exc}); check the network, or give a local directory") from None


def _quiet_transformers() -> None:
    """transformers' own progress bars and warnings would drown the run's display (and the one-line errors)."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # its retry warnings would break the one-line errors


def _load_error(what: str, name: str, exc: Exception) -> BadInput:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return BadInput(f"cannot load {what} {name!r}: {first}")


def load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError (hub, missing files), ValueError (unknown class): the user's to fix
        raise _load_error("tokenizer", name, exc) from None
    return tokenizer


def ensure_pad_token(tokenizer, name: str) -> str | None:
    """A tokenizer without a pad token pads with eos; returns a note to record, or None."""
    if tokenizer.pad_token_id is not None:
        return None
    if tokenizer.eos_token is None:
        raise BadInput(f"tokenizer of {name!r} has neither a pad nor an eos token")
    tokenizer.pad_token = tokenizer.eos_token
    return f"tokenizer of {name} has no pad token: padding with eos {tokenizer.eos_token!r}"


def load_causal_lm(name: str, trust_remote_code: bool, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name)
    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, dtype=dtype)
    except Exception as exc:  # OSError (hub, no weights), ValueError (unknown architecture)
        raise _load_error("model", name, exc) from None
    return model


def max_positions(model) -> int | None:
    config = model.config
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_model, student_model) -> bool:
    """Logit KD needs one vocabulary: equal vocab_size and identical ids on probe strings."""
    if teacher_model.config.vocab_size != student_model.config.vocab_size:
        return False
    probes = ["Hello, how are you?", "A: hi . B: the sky is blue .", " 12345 !?", "über naïve café"]
    return all(teacher_tokenizer(s, add_special_tokens=False)["input_ids"]
               == student_tokenizer(s, add_special_tokens=False)["input_ids"] for s in probes)
