"""``transformers``: a Hugging Face classifier, from a local folder / hub id or from a config.

    model: {name: transformers, pretrained: path/to/bert-folder}                  # from_pretrained
    model: {name: transformers, config: {model_type: bert, hidden_size: 128,       # from scratch
            num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 256, vocab_size: 64}}
    model: {name: transformers, task: image-classification, config: {model_type: vit, ...}}
    model: {name: transformers, task: causal-lm, config: {model_type: gpt_neo, vocab_size: 256, ...}}

``num_classes`` (from the data) becomes ``num_labels`` (a causal LM predicts its vocabulary instead).
For ``causal-lm`` pick a GPT-2-style family whose projections are ``nn.Linear`` (``gpt_neo``,
``llama``, ...): GPT-2's own ``Conv1D`` layers are not traced by Torch-Pruning. The model returns a ``ModelOutput``; its
``logits`` are what every stage and metric reads (:mod:`compress.calls`), and a text model takes
the data's ``{"input_ids", "attention_mask"}`` as keyword arguments. ``transformers`` is imported
only here, when such a model is built (``pip install transformers``; it needs no torchvision).
A checkpoint of a pruned or compressed model rebuilds the architecture from the same keys and loads
its own weights (``weights_only``), so ``pretrained`` must still be readable when it is reloaded; being
code that reads the files its arguments name, it is rebuilt from a file only on trust
(:func:`compress.models.build_from_spec`).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from compress.errors import UserError
from compress.models._registry import MODELS

__all__ = ["TASKS", "transformers_model"]

TASKS = {"sequence-classification": "AutoModelForSequenceClassification",
         "image-classification": "AutoModelForImageClassification",
         "causal-lm": "AutoModelForCausalLM"}


@MODELS.register("transformers")
def transformers_model(task: str = "sequence-classification", pretrained: str | None = None,
                       config: dict[str, Any] | None = None, num_classes: int | None = None,
                       attn_implementation: str = "eager") -> nn.Module:
    """A ``transformers`` Auto model for ``task``.

    Args:
        task: ``sequence-classification`` (text), ``image-classification`` or ``causal-lm`` (next token).
        pretrained: a folder written by ``save_pretrained`` (or a hub id, with a network).
        config: instead of ``pretrained``: ``model_type`` plus that config's keys (random weights).
        num_classes: the number of labels (filled from the data).
        attn_implementation: ``eager`` (default: plain matmul attention that every tracer, pruner and
            exporter here follows) or ``sdpa``.
    """
    if task not in TASKS:
        raise UserError(f"model.task: unknown task '{task}'; valid: {', '.join(TASKS)}")
    if (pretrained is None) == (config is None):
        raise UserError("model: give either model.pretrained (a folder or hub id) or model.config (model_type and "
                        "its keys), not " + ("both" if pretrained is not None else "neither"))
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise UserError("model.name: transformers is not installed; pip install transformers") from None
    auto = getattr(transformers, TASKS[task])
    labels = {} if num_classes is None or task == "causal-lm" else {"num_labels": int(num_classes)}
    if pretrained is not None:
        try:
            return auto.from_pretrained(str(pretrained), attn_implementation=attn_implementation, **labels)
        except (OSError, ValueError) as e:
            raise UserError(f"model.pretrained: cannot load '{pretrained}' ({str(e).strip().splitlines()[0][:200]})") \
                from None
    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise UserError("model.config.model_type: required (bert, vit, distilbert, ...)")
    try:
        cfg = transformers.AutoConfig.for_model(str(model_type), **values, **labels)
    except (ValueError, TypeError) as e:
        raise UserError(f"model.config: {str(e).strip().splitlines()[0][:200]}") from None
    cfg._attn_implementation = attn_implementation
    return auto.from_config(cfg)
