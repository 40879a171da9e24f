"""A model directory checked before any rank loads it: its config, its weights' shapes, its vocabulary.

Each check reads only metadata (``config.json``, the safetensors headers, the tokenizer) and names
the file at fault in one sentence, so a bad directory stops the job before a process group exists
and before a byte of weights is read.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from smt_dist.files.base_checkpoint import SafetensorsCheckpoint


def require_model_dir(model_dir: Path) -> None:
    """A local model directory: no model hub is reached at run time."""
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"Model directory {model_dir} does not exist (no model hub is reached at run time)."
        )


def read_config(model_dir: Path):
    """The model's ``PretrainedConfig``, validated by transformers, or one sentence naming the file."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    require_model_dir(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json.")
    try:
        return AutoConfig.from_pretrained(model_dir)
    # transformers' own validators raise huggingface_hub's StrictDataclassError (not a ValueError)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise ValueError(f"{path} is not a valid model config: {_reason(err)}") from err


def empty_model(model_dir: Path) -> nn.Module:
    """The model's modules with parameters on the meta device: names and shapes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = read_config(model_dir)
    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as err:  # an architecture transformers cannot build
        raise ValueError(
            f"{model_dir / 'config.json'} describes no model transformers can build: {_reason(err)}"
        ) from err


def check_weights(model_dir: Path, model: nn.Module) -> SafetensorsCheckpoint:
    """Every weight ``model`` (built from the config) expects is in the files, with the config's shape.

    Tied weights (one parameter under several names) need only one of their names in the files.
    """
    checkpoint = SafetensorsCheckpoint(model_dir)
    names_of: dict[int, list[str]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
        expected[name] = tuple(tensor.shape)
    for names in names_of.values():
        present = [n for n in names if n in checkpoint]
        if not present:
            raise ValueError(
                f"{model_dir} lacks the weight {names[0]} that its config.json describes; "
                "it is not this model's checkpoint."
            )
        for name in present:
            if checkpoint.shapes[name] != expected[name]:
                raise ValueError(
                    f"{model_dir / checkpoint.key_file[name]}: {name} has shape "
                    f"{list(checkpoint.shapes[name])} where config.json makes it {list(expected[name])}."
                )
    return checkpoint


def check_vocabulary(model_dir: Path, tokenizer, model: nn.Module) -> None:
    """Every token id the tokenizer can produce has a row in the model's input embedding."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"The tokenizer in {model_dir} has {len(tokenizer)} tokens but the model's embedding "
            f"(config.json vocab_size) has {rows} rows; the two do not belong together."
        )


def _reason(err: BaseException) -> str:
    """The innermost line of an error's message (transformers wraps validators' messages)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return last.split(": ", 1)[1] if last.startswith(("ValueError: ", "TypeError: ")) else last
