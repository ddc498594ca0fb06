"""Load a Hugging Face causal LM and its tokenizer for training, from a local directory or a GGUF file.

GGUF checkpoints are dequantised to dense float32 at load time, and the quantisation markers
transformers leaves on the model (``hf_quantizer``, ``is_quantized``, ``quantization_method``,
``config.quantization_config``) are then removed: with them the ``Trainer`` refuses to train
("You cannot perform fine-tuning on purely quantized models", or, with LoRA, "quantized with
QuantizationMethod.GGUF ... do not support training") although every weight is an ordinary dense
tensor. A ``deepcopy`` of the cleared model (the reference) is clean too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .._optional import require

__all__ = ["drop_quantization_markers", "load_causal_lm"]

# What a Hub repository id looks like ("gpt2", "org/name"); anything else that is not an existing
# directory is reported as "no such directory" without asking the Hub.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def drop_quantization_markers(model: Any) -> Any:
    """Mark a model whose weights are all dense as not quantised, so it can be trained.

    Args:
        model: a ``PreTrainedModel`` loaded from a GGUF file with its weights dequantised.

    Returns:
        the same model, without ``hf_quantizer``, ``quantization_method`` and
        ``config.quantization_config``, and with ``is_quantized`` false.

    Raises:
        ValueError: some weight is still packed (a non-floating parameter or a GGUF layer); such
            a model cannot be trained, and the markers are left as they are.
    """
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    packed += [name for name, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise ValueError(f"the model still holds quantised weights ({packed[0]}, ... {len(packed)} in all): "
                         f"it cannot be trained; load it dequantised")
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    try:
        model.is_quantized = False
    except AttributeError:  # a read-only property (derived from hf_quantizer) in some versions
        pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def _check_local(model: str, gguf_file: str | None) -> bool:
    """Raise a clear error for a path that cannot be a model; return whether ``model`` is local."""
    path = Path(model).expanduser()
    if path.is_dir():
        if gguf_file and not Path(gguf_file).is_file() and not (path / gguf_file).is_file():
            found = sorted(f.name for f in path.glob("*.gguf"))
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in --model {model!r} (`--gguf-file`); "
                                    f"it holds {found or 'no .gguf files'}")
        return True
    if path.exists():
        raise ValueError(f"--model {model!r} is a file, not a directory: give the directory that holds the model "
                         f"(for a GGUF file: --model DIR --gguf-file NAME)")
    if not _HUB_ID.fullmatch(model):
        raise FileNotFoundError(f"--model {model!r}: no such directory")
    return False


def load_causal_lm(model: str, gguf_file: str | None = None) -> tuple[Any, Any]:
    """A trainable causal LM and its tokenizer.

    Args:
        model: a local directory (``config.json`` + weights, or one holding ``gguf_file``), or a
            Hugging Face Hub id (only where the Hub or its local cache is reachable).
        gguf_file: a GGUF file name inside ``model`` (or a path); its weights are dequantised to
            float32 and the model is marked trainable (see :func:`drop_quantization_markers`).

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (its EOS token when it had none).

    Raises:
        FileNotFoundError: ``model`` is neither a directory nor a Hub id, or has no ``gguf_file``.
        ValueError: the model cannot be loaded (one line, with the reason).
        MissingDependency: ``transformers`` (or ``gguf``/``accelerate`` for a GGUF file) is missing.
    """
    require("transformers", "trl", "apo-kernels train --model", load=False)
    extra: dict[str, Any] = {}
    if gguf_file:
        require("gguf", "trl", "--gguf-file", load=False)
        require("accelerate", "trl", "--gguf-file", load=False)
    local = _check_local(model, gguf_file)
    source = str(Path(model).expanduser()) if local else model  # transformers does not expand "~"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_extra: dict[str, Any] = {}
    if gguf_file:
        extra["gguf_file"] = gguf_file
        # Dense float32: training needs plain weights, and dequantised values are exact in fp32.
        model_extra["dtype"] = torch.float32
        try:
            from transformers import GgufConfig  # newer transformers may keep GGUF blocks packed
        except ImportError:  # older ones always dequantise
            pass
        else:
            model_extra["quantization_config"] = GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        lm = AutoModelForCausalLM.from_pretrained(source, **extra, **model_extra)
    except (OSError, ValueError) as exc:
        if local:
            raise ValueError(f"cannot load --model {model!r}: {_first_line(exc)}") from None
        raise ValueError(f"--model {model!r} is not a local directory, and loading it from the Hugging Face Hub "
                         f"failed (models must be local directories where the Hub is unreachable): "
                         f"{_first_line(exc)}") from None
    if gguf_file:
        drop_quantization_markers(lm)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer
