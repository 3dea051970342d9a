"""Load models and tokenizers (HF id or path, dtype, gradient checkpointing, LoRA) and build the
built-in tiny model.

The tiny model is a random-initialised Qwen2 with a character-level tokenizer built locally with
the ``tokenizers`` library (docs/design.md §9). It is saved as a normal HF directory, so every later
code path (training, evaluation, vLLM, export) treats it like a real model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rltk.schema import ConfigError, LoraConfig, ModelConfig, TinyModelConfig

log = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
TINY_TOKENIZER_VERSION = 2  # 2: Qwen2 byte-level BPE without merges (1 dropped spaces when reloaded)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def torch_dtype(name: str):
    """``model.dtype`` as ``from_pretrained`` takes it (a torch dtype, or "auto")."""
    return _DTYPES[name]


def build_char_tokenizer(charset: str):
    """A character-level tokenizer: one token per character of ``charset`` plus pad/eos/unk.

    It is a Qwen2 byte-level BPE with no merges, whose vocabulary is the byte-level symbols of
    ``charset`` (space is ``Ġ``, newline ``Ċ``). ``AutoTokenizer`` loads a Qwen2 model's tokenizer
    as ``Qwen2Tokenizer`` whatever ``tokenizer_config.json`` says, so building it as one makes the
    saved directory load back exactly as built (in transformers, vLLM or any other consumer).
    Characters outside ``charset`` have no token and are dropped.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    alphabet = ByteLevel.alphabet()
    byte_symbol = {b: ch for b, ch in zip(range(256), _bytes_to_unicode())}
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in sorted(set(charset)):
        encoded = ch.encode()
        if len(encoded) != 1 or byte_symbol[encoded[0]] not in alphabet:
            raise ValueError(f"character {ch!r} is not a single byte; the tiny tokenizer covers ASCII only")
        vocab.setdefault(byte_symbol[encoded[0]], len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=UNK, eos_token=EOS, pad_token=PAD)
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = 4096
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-unicode table (the ByteLevel alphabet), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Create the tiny Qwen2 model + character tokenizer as an HF directory at ``out_dir``.

    Idempotent: an existing complete directory is reused. Written to a temporary directory first
    and renamed, so a crash never leaves a half-written model behind.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rltk.data.synthetic import CHARSET

    cfg = cfg or TinyModelConfig()
    out_dir = Path(out_dir)
    fingerprint = {"tiny": dataclasses.asdict(cfg), "tokenizer": TINY_TOKENIZER_VERSION}
    marker = out_dir / "rltk_tiny.json"
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        return out_dir
    if out_dir.exists():
        log.warning("tiny model at %s was built with other settings; building it again", out_dir)
    tokenizer = build_char_tokenizer(CHARSET)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "rltk_tiny.json").write_text(json.dumps(fingerprint))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny model (%d parameters) at %s", model.num_parameters(), out_dir)
    return out_dir


def resolve_model_path(cfg: ModelConfig, work_dir: str | Path) -> str:
    """The HF id or directory to load: ``tiny`` is built under ``work_dir/tiny-init`` first."""
    if cfg.name_or_path == "tiny":
        return str(build_tiny_model(Path(work_dir) / "tiny-init", cfg.tiny))
    return cfg.name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token and left padding (prompts are left-padded for generation)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"model.name_or_path: cannot load a tokenizer from '{name_or_path}': "
                          f"{str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name_or_path: str, cfg: ModelConfig, *, trainable: bool = True):
    """A causal LM by id or path, with gradient checkpointing and LoRA. A trainable model's weights
    are float32 masters (``model.dtype`` is then the autocast compute dtype; bf16 only under
    ``model.pure_bf16``; a frozen LoRA base keeps ``model.dtype``): rltk.precision. A frozen
    model loads in ``model.dtype``."""
    from rltk.precision import check_master_weights, trainable_load_dtype

    dtype = trainable_load_dtype(cfg) if trainable else cfg.dtype
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.lora is not None and cfg.lora.load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config()
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model.name_or_path: cannot load '{name_or_path}': {str(exc).splitlines()[0]}") from None
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    check_master_weights(model, cfg)
    return model


def apply_lora(model, cfg: LoraConfig):
    """Wrap ``model`` with a LoRA adapter (peft); only the adapter is trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def _four_bit_config():
    try:
        from transformers import BitsAndBytesConfig

        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.lora.load_in_4bit needs bitsandbytes on a CUDA machine: pip install bitsandbytes") from None
    if not torch.cuda.is_available():
        raise ConfigError("model.lora.load_in_4bit (QLoRA) needs a CUDA GPU; bitsandbytes 4-bit does not run on CPU: "
                          "set model.lora.load_in_4bit=false")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
