"""Load teacher and student the way users name them: a hub id, a local directory or `embedded:NAME`."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..contract.errors import BadInput
from ..contract.rundir import STUDENT, is_compare_dir, recorded_run
from . import checkpoint as ckpt

EMBEDDED_PREFIX = "embedded:"


def resolve_model_source(name: str, weights: bool = True) -> str:
    """A loadable path or hub id; `embedded:NAME` maps to the packaged model, a missing local path is an error, and
    so is a local directory that holds no causal LM, or lacks a part of one (not its weights, with `weights` False:
    estimate-memory reads only the config and the tokenizer)."""
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
        _refuse_run_directory(name, path)
        _check_model_directory(name, path, weights)
        return str(path)
    _refuse_web_address(name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise BadInput(f"model path {name}: no such directory")
    if not HUB_ID.fullmatch(name) or "--" in name or ".." in name:  # the hub's own rule (validate_repo_id)
        raise BadInput(f"model {name!r} is neither a local directory nor a valid hub id (ORG/NAME of letters, "
                       "digits, '-', '_' and '.', no spaces)")
    check_hub_reachable(name)
    hub_config = _hub_config_file(name)
    if hub_config is not None:
        _refuse_non_causal(hub_config, f"hub model {name} is")
    return name  # a hub id


HUB_ID = re.compile(r"[A-Za-z0-9_.\-]{1,96}(/[A-Za-z0-9_.\-]{1,96})?")
HUB_HOSTS = ("huggingface.co", "hf.co")


def _refuse_web_address(name: str) -> None:
    """A model's web page (`https://huggingface.co/ORG/NAME`, copied from the browser) is no hub id: say which."""
    url = urlparse(name if "://" in name else f"https://{name}" if name.startswith(HUB_HOSTS) else "")
    if not url.netloc:
        return
    host = url.netloc.lower().removeprefix("www.")
    parts = [part for part in url.path.split("/") if part]
    if host in HUB_HOSTS and parts and parts[0] not in ("datasets", "spaces"):
        repo = "/".join(parts[:2])
        raise BadInput(f"model {name} is a web address: give its hub id, {repo}, not the URL")
    raise BadInput(f"model {name} is a web address: give a hub id (ORG/NAME) or a local directory, not a URL")


def _hub_config_file(repo_id: str) -> Path | None:
    """The config.json of hub model `repo_id`, from the cache or fetched (transformers fetches it first anyway);
    None when it cannot be had, for the load to say why."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception:  # not found, offline and not cached, an id the hub refuses: loading it names the problem
        return None


def _refuse_run_directory(name: str, path: Path) -> None:
    """A sarkd-diag run (or comparison) directory, or a checkpoint of a run, is not a model: point at the student it
    saved (a checkpoint holds the trainable weights alone, for --resume-from)."""
    if (path / ckpt.META).is_file() and (path / ckpt.STATE).is_file():
        student = path.parent.parent / STUDENT
        where = f"the run's trained student is in {student}" if (student / "config.json").is_file() else \
            f"its run has no saved student; continue it with --resume-from {path}"
        raise BadInput(f"model path {name} is a sarkd-diag checkpoint (the trainable weights and training state "
                       f"--resume-from continues), not a model: {where}")
    if is_compare_dir(path):
        raise BadInput(f"model path {name} is a compare-precision directory; each mode's trained student is in "
                       f"{path / 'runs' / 'MODE' / 'student'}")
    if recorded_run(path) is None:
        return  # a model's own config.json
    student = path / STUDENT
    if (student / "config.json").is_file():
        raise BadInput(f"model path {name} is a sarkd-diag run directory; its trained student is in {student}")
    raise BadInput(f"model path {name} is a sarkd-diag run directory without a trained student (student/ is saved "
                   "when a run completes or is interrupted); give a model directory written by save_pretrained")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")
WEIGHT_FILES = ("*.safetensors", "*.bin")  # single files and shards (their index sits beside them)
MODEL_PARTS = {  # what a directory needs to train, how its absence is named, and what writes it
    "config": ("config.json", "the model (model.save_pretrained)"),
    "weights": ("weights (*.safetensors or *.bin)", "the model (model.save_pretrained)"),
    "tokenizer": ("tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, ...)",
                  "its tokenizer (tokenizer.save_pretrained)"),
}


def _check_model_directory(name: str, path: Path, weights: bool) -> None:
    """Say what a local model directory holds when it cannot be trained, before any part of it loads: a model of
    another kind (an encoder-decoder, a vision model: transformers' "Unrecognized configuration class"), or the
    parts it lacks, all of them (transformers names one at a time, the tokenizer's first whatever else is absent)."""
    if (path / "adapter_config.json").is_file():
        return  # a PEFT adapter: transformers loads its base model and applies it
    config_file = path / "config.json"
    if config_file.is_file():
        _refuse_non_causal(config_file, f"model path {name} holds")
    present = {"config": config_file.is_file(),
               "weights": any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES),
               "tokenizer": any((path / f).is_file() for f in TOKENIZER_FILES)}
    missing = [part for part in MODEL_PARTS if not present[part] and (weights or part != "weights")]
    if not missing:
        return
    absent = [f"no {MODEL_PARTS[part][0]}" for part in missing]
    lacks = " and ".join(filter(None, (", ".join(absent[:-1]), absent[-1])))
    if not any(present.values()):
        models = sorted(sub.name for sub in path.iterdir() if (sub / "config.json").is_file())
        where = (f"give the model directory inside it: {', '.join(models[:3])}" if models
                 else "give a directory written by save_pretrained (the model's and its tokenizer's)")
        raise BadInput(f"model path {name} holds no model: it has {lacks}; {where}")
    writers = " and ".join(dict.fromkeys(MODEL_PARTS[part][1] for part in missing))
    raise BadInput(f"model path {name} has {lacks}: save {writers} there")


def _refuse_non_causal(config_file: Path, subject: str) -> None:
    """A model type transformers knows but cannot load as a causal LM (`subject`: what holds it, a local directory
    or a hub model, cached or not): name what it holds instead of
    "Unrecognized configuration class ... for AutoModelForCausalLM". A type transformers does not know, or one
    whose own code says it is a causal LM (auto_map), is for transformers to load or refuse."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable or not JSON: transformers says so
    model_type = config.get("model_type") if isinstance(config, dict) else None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if (model_type not in CONFIG_MAPPING_NAMES or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            or (isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map)):
        return
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    kind = ", ".join([*architectures, *(["an encoder-decoder"] if config.get("is_encoder_decoder") else [])])
    raise BadInput(f"{subject} a {model_type} model{f' ({kind})' if kind else ''}, not a causal "
                   "language model: sarkd-diag distils decoder-only LMs (GPT-2, Llama, Mistral, Qwen, Mixtral, ...); "
                   "give one of those")


HUB_CONNECT_TIMEOUT_S = 10
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


HUB_FIRST_FILE = {"model": "config.json", "dataset": "README.md"}  # what loading one asks the hub for first


def check_hub_reachable(repo_id: str, repo_type: str = "model") -> None:
    """A hub model or dataset that is not cached needs the hub: say so in a moment, not after a minute of retries.

    Skipped offline (transformers and datasets then fail at once), for a cached repository, and behind a proxy
    (where a direct connection proves nothing).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    try:
        if isinstance(try_to_load_from_cache(repo_id, HUB_FIRST_FILE[repo_type], repo_type=repo_type), str):
            return
    except Exception:  # an id the cache cannot even parse: transformers or datasets name the problem
        return
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        what, local = ("", "a local directory") if repo_type == "model" else ("dataset ", "a local --train-file")
        raise BadInput(f"cannot load {what}{repo_id!r}: the hub at {constants.ENDPOINT} cannot be reached "
                       f"({exc.strerror or exc}); check the network, or give {local}") from None


def _quiet_transformers() -> None:
    """transformers' own progress bars and warnings would drown the run's display (and the one-line errors)."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # its retry warnings would break the one-line errors


MAX_REASON_CHARS = 400


def _reason(exc: Exception) -> str:
    """An exception's message as one complete line: its lines joined, cut after a whole sentence if very long."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= MAX_REASON_CHARS:
        return text
    end = text.rfind(". ", 0, MAX_REASON_CHARS)
    return text[:end + 1] if end > 0 else text[:MAX_REASON_CHARS].rsplit(" ", 1)[0] + " …"


def _is_hub_id(name: str) -> bool:
    return not name.startswith(EMBEDDED_PREFIX) and not Path(name).expanduser().exists()


def model_load_error(what: str, name: str, exc: Exception) -> BadInput:
    """One complete line on why `name` cannot be loaded; offline and not-found hub ids said plainly."""
    if _is_hub_id(name) and isinstance(exc, OSError):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return BadInput(f"cannot load {what} {name!r}: it is not in the local Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set, so it cannot be downloaded; "
                            "give a local directory, or download it once online")
        text = _reason(exc)
        if "not a valid model identifier" in text or "404" in text or "Repository Not Found" in text:
            return BadInput(f"cannot load {what} {name!r}: no such model on the hub ({constants.ENDPOINT}) and no "
                            "such local directory")
        if "couldn't connect" in text.lower():
            return BadInput(f"cannot load {what} {name!r}: the hub ({constants.ENDPOINT}) cannot be reached and "
                            "it is not in the local cache; check the network, or give a local directory")
    cut = _cut_short_weights(Path(name).expanduser())
    if cut is not None:  # the library says "incomplete metadata, file not fully covered"
        return BadInput(f"cannot load {what} {name!r}: {cut}")
    return BadInput(f"cannot load {what} {name!r}: {_reason(exc)}")


def _cut_short_weights(directory: Path) -> str | None:
    """A safetensors file of a model directory that is shorter than its own header says (a copy or download that
    stopped part-way), said as such; None when each is whole (or it is no local directory)."""
    if not directory.is_dir():
        return None
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_size)) if size >= 8 + header_size else None
        except (OSError, ValueError):
            header = None
        if not isinstance(header, dict):
            return f"{path} is no whole safetensors file ({size:,} bytes, no readable header): copy or download it " \
                "again"
        ends = [t["data_offsets"][1] for t in header.values() if isinstance(t, dict) and "data_offsets" in t]
        expected = 8 + header_size + max(ends, default=0)
        if size < expected:
            return (f"{path} is cut short ({size:,} bytes of the {expected:,} its header describes): a copy or "
                    "download that did not finish; copy or download it again")
    return None


def _load_error(what: str, name: str, exc: Exception) -> BadInput:
    return model_load_error(what, name, exc)


def load_tokenizer(name: str, trust_remote_code: bool, weights: bool = True):
    """`name`'s tokenizer; `weights` False: of a directory that may hold no weights (`resolve_model_source`)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name, weights)
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


def check_causal(model, option: str, name: str) -> None:
    """Refuse a model that sees the tokens it is to predict. AutoModelForCausalLM also loads encoders (BERT,
    RoBERTa, Electra as `...LMHeadModel` / `...ForCausalLM`), which attend in both directions unless their config
    says `is_decoder=True`: trained on next-token prediction, such a model reads the answer at every position, its
    loss falls to nothing and no numerical check can tell. One forward pair of three tokens, in eval mode (no
    dropout), tells: the logits at the first position must not change when only the last token does (beyond what
    a kernel's rounding could; NaN where both are NaN — a forward that overflows is still causal)."""
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3]], device=device) % vocab
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % vocab
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first, changed = (model(input_ids=batch).logits[0, 0].float() for batch in (ids, other))
    finally:
        model.train(training)
    same = torch.isclose(first, changed, rtol=1e-3, atol=1e-3 * float(first.nan_to_num().abs().max()),
                         equal_nan=True)
    if not bool(same.all()):
        raise BadInput(f"{option} {name} is not a causal LM: its prediction for the first token changes with the "
                       "tokens after it, so it would read every answer it is trained to predict (a bidirectional "
                       "encoder such as BERT; its config needs is_decoder=True, or give a decoder-only model)")


def check_ids_fit(largest: int, model, option: str, name: str, tokenizer_name: str) -> None:
    """A token id beyond the model's embedding rows fails in the first forward as an IndexError deep in torch: the
    tokenizer is not the model's, or tokens were added to it without resizing the embeddings. Refused once the
    data is tokenized, from the largest id the model will see (a tokenizer's unused added tokens do no harm)."""
    rows = model.get_input_embeddings().num_embeddings
    if largest >= rows:
        raise BadInput(f"{option} {name} has {rows} token embeddings, but the tokenizer of {tokenizer_name} gives "
                       f"the data token id {largest}: the tokenizer is not this model's, or tokens were added to it "
                       "without model.resize_token_embeddings(len(tokenizer)); save the model with its own tokenizer")


def max_positions(model) -> int | None:
    config = model.config
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def check_block_fits(block_size: int, positions: int | None, name: str) -> None:
    """A block longer than a model's position table would fail in its first forward, deep in the embedding; train
    refuses it before loading any data, and estimate-memory before estimating a run that cannot start."""
    if positions is not None and block_size > positions:
        raise BadInput(f"--block-size {block_size} exceeds {name}'s {positions} positions")


def shared_vocabulary(teacher_tokenizer, student_tokenizer, teacher_vocab: int, student_vocab: int) -> int | None:
    """How many logit columns logit KD compares, or None where it cannot (two tokenizers: identical ids on probe
    strings tell one). Equal vocab sizes: all of them. Sizes that differ only by padding rows — a vocab_size rounded
    up past the tokenizer, as Qwen2.5-7B's 152064 against 0.5B's 151936 over one tokenizer — where every id of the
    tokenizers lies below both: the smaller, the ids they share."""
    probes = ["Hello, how are you?", "A: hi . B: the sky is blue .", " 12345 !?", "über naïve café"]
    if not all(teacher_tokenizer(s, add_special_tokens=False)["input_ids"]
               == student_tokenizer(s, add_special_tokens=False)["input_ids"] for s in probes):
        return None
    sizes = (teacher_vocab, student_vocab)  # the heads' sizes: each model's vocab_size
    if sizes[0] == sizes[1]:
        return sizes[0]
    ids = max(len(teacher_tokenizer), len(student_tokenizer))
    return min(sizes) if len(teacher_tokenizer) == len(student_tokenizer) and ids <= min(sizes) else None
