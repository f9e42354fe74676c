"""The Python API: train, load, save, generate, stream, score, evaluate.

A model is a `Checkpoint` (config, tokenizer, weights and, after training, the optimizer state):
what `train` returns, what `load` reads and `save` writes. See docs/api.md for examples.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import fields
from itertools import chain
from typing import Callable, Iterator, NamedTuple

from . import sample
from .checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import ConfigError, GPTConfig, TrainConfig
from .config import preset as preset_settings
from .data import read_text

__all__ = ["Checkpoint", "Score", "evaluate", "explain", "generate", "load", "save", "score",
           "stream", "train"]


class Score(NamedTuple):
    logprob: float  # natural log-probability of the scored tokens
    loss: float  # mean negative log-probability per token (nats/token)
    tokens: int  # how many tokens were scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def load(path: str) -> Checkpoint:
    """A model from a checkpoint file, or from a run directory (its best checkpoint, else its
    last)."""
    return load_checkpoint(resolve_checkpoint(path))


def save(model: Checkpoint, path: str) -> None:
    """Write a model to one safetensors file, atomically."""
    save_checkpoint(path, model)


def train(data: str | None = None, *, preset: str = "default", out: str | None = None,
          resume: bool = False, init_from: str | None = None, force: bool = False,
          callback: Callable[[dict], bool | None] | None = None, quiet: bool = True,
          **settings) -> Checkpoint:
    """Train a model and return it.

    data: a UTF-8 text file (default: the bundled names). preset: the starting settings
    ("default", "microgpt", "gpt2", "llama"); `settings` override any GPTConfig or TrainConfig
    field, e.g. steps=500, n_embd=32, pos="sinusoidal", batch_size=8. out: a run directory to
    write checkpoints, metrics and the loss plot to (None: nothing is written). resume: continue the
    run in `out` (settings then may only change what a resume allows, e.g. steps or lr).
    force: replace a run already in `out` (otherwise refused). init_from: start from a
    checkpoint's weights and vocabulary, with a fresh optimizer (fine-tuning).
    callback(info) runs after every step with {"step", "loss", "lr", "tokens", "val_loss"};
    returning False stops training.
    """
    # (the module puregpt/train.py, not this function, which shadows it as puregpt.train)
    from .train import API
    from .train import train as run_training
    model_keys = {f.name for f in fields(GPTConfig)} - {"vocab_size"}
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = set(settings) - model_keys - train_keys
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    model_set = {k: v for k, v in settings.items() if k in model_keys}
    train_set = {k: v for k, v in settings.items() if k in train_keys}
    if data is not None:
        _check_type("data", data, (str, os.PathLike), "a file path or None")
        data = os.fspath(data)
        if not data.strip():
            raise ConfigError("data is empty: name a text file (or None for the bundled names)")
    if out is not None:
        _check_type("out", out, (str, os.PathLike), "a directory path or None")
        out = os.fspath(out)
    if init_from and model_set:
        raise ConfigError(f"init_from takes the model's shape from the checkpoint; do not pass "
                          f"model settings with it: {', '.join(sorted(model_set))}")
    if resume:
        if model_set:
            raise ConfigError(f"cannot change the model of a run being resumed: "
                              f"{', '.join(sorted(model_set))}")
        result = run_training(None, None, data, out, resume=True, overrides=train_set,
                              quiet=quiet, callback=callback, words=API)
    else:
        chosen = preset_settings(preset)
        model_config = None if init_from else GPTConfig.from_dict({**chosen["model"],
                                                                   **model_set})
        result = run_training(model_config,
                              TrainConfig.from_dict({**chosen["train"], **train_set}), data, out,
                              init_from=init_from, force=force, quiet=quiet, callback=callback,
                              words=API)
    corpus = result.corpus
    return Checkpoint(result.config, result.tokenizer, result.params, result.step,
                      result.train_config, trainer={"data": corpus.path, "mode": corpus.mode,
                                                    "sha256": corpus.sha256,
                                                    "best_val": result.best_val})


def _docs_mode(model: Checkpoint) -> bool:
    return model.trainer.get("mode", "docs") == "docs"


def _check_type(name: str, value, kinds: tuple, what: str) -> None:
    """A TypeError naming the parameter, for an argument of the wrong type (bool is not an
    int here: top_k=True is a mistake)."""
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} ({value!r:.60})")


def _check_model(model) -> None:
    _check_type("model", model, (Checkpoint,), "a puregpt model (from puregpt.train or "
                "puregpt.load)")


def stream(model: Checkpoint, prompt: str = "", *, max_new_tokens: int | None = None,
           temperature: float = 0.5, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
           stop: str | None = None, seed: int | None = None, workers: int = 1,
           layout: str | None = None, compact: bool = False) -> Iterator[str]:
    """Generate text, yielding it piece by piece as it is produced: the prompt first (when
    there is one), then each new piece, so that the pieces join into prompt + continuation,
    as `puregpt sample --prompt` prints it.

    A docs-mode model generates one document: it stops at the end-of-document token or after
    max_new_tokens (default block_size). A stream-mode model continues the prompt for
    max_new_tokens (default 256). temperature, top_k and top_p shape the distribution (in that
    order); greedy takes the most likely token; stop ends the text just before that string
    (searched in the new text); seed makes the output reproducible. Arguments of the wrong
    type raise TypeError; bad settings and prompts outside the vocabulary raise ValueError, at
    once, before anything is generated.

    workers > 1 (0: one per core), a layout or compact=True decode with prepared weights
    (puregpt.decode.Decoder): the matrix-vector products split across `workers` processes
    (same tokens as one); layout says how the weights are held: "tuple" (fastest, ~36 bytes a
    parameter), "mixed" (30% of each matrix's rows tuples, ~18 bytes) or "array" (4 or 8
    bytes, ~0.5x the speed; compact=True is layout="array"); None: decode.default_layout for
    the model's size and the processes.
    Every layout gives the same tokens. The worker processes stop when the stream is exhausted
    or closed.
    """
    _check_model(model)
    _check_type("prompt", prompt, (str,), "a string")
    if max_new_tokens is not None:
        _check_type("max_new_tokens", max_new_tokens, (int,), "an int or None")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        _check_type(name, value, (int, float), "a number")
    _check_type("top_k", top_k, (int,), "an int")
    _check_type("greedy", greedy, (bool,), "True or False")
    if stop is not None:
        _check_type("stop", stop, (str,), "a string or None")
    if seed is not None:
        _check_type("seed", seed, (int,), "an int or None")
    _check_type("workers", workers, (int,), "an int")
    _check_type("compact", compact, (bool,), "True or False")
    if layout is not None:
        _check_type("layout", layout, (str,), "a string or None")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per core), got {workers}")
    from .decode import LAYOUTS, Decoder
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} or None, got {layout!r}")
    if compact and layout not in (None, "array"):
        raise ValueError(f"compact=True is layout='array': it contradicts layout={layout!r}")
    decoder = None
    if workers != 1 or compact or layout is not None:
        decoder = Decoder(model.params, model.config, "array" if compact else layout, workers)
    try:
        pieces = sample.stream_text(model.params, model.config, model.tokenizer, prompt,
                                    _docs_mode(model), max_new_tokens, stop, random.Random(seed),
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    greedy=greedy,
                                    tokens_from=decoder and decoder.generator())
    except BaseException:
        if decoder is not None:
            decoder.close()
        raise
    return chain([prompt] if prompt else [], _closing(pieces, decoder))


def _closing(pieces, decoder):
    """The pieces; the decoder's worker processes stop when they end (or the stream closes)."""
    try:
        yield from pieces
    finally:
        if decoder is not None:
            decoder.close()


def generate(model: Checkpoint, prompt: str = "", **options) -> str:
    """The text `stream` produces, as one string: the prompt and its continuation (same
    options)."""
    return "".join(stream(model, prompt, **options))


def score(model: Checkpoint, text: str) -> Score:
    """How likely the model finds `text`: a whole document (with its end) for docs-mode
    models, a stretch of text for stream-mode models."""
    _check_model(model)
    _check_type("text", text, (str,), "a string")
    logprob, n = sample.score_text(model.params, model.config, model.tokenizer, text,
                                   _docs_mode(model))
    return Score(logprob, -logprob / n, n)


def evaluate(model: Checkpoint, path: str) -> Score:
    """Mean loss (and .perplexity) over a text file: every document, or the whole stream."""
    _check_model(model)
    _check_type("path", path, (str, os.PathLike), "a file path")
    logprob, n = sample.score_corpus(model.params, model.config, model.tokenizer,
                                     read_text(os.fspath(path)), _docs_mode(model))
    return Score(logprob, -logprob / n, n)


def explain(model: Checkpoint, text: str) -> dict:
    """The x-ray of `text` under the model, as `puregpt explain --json` writes it: tokens with
    their log-probabilities, every head's attention, next-token logits and probabilities, the
    residual stream, one training step's gradient norms and update ratios, the ops in order and
    the embeddings' PCA (see puregpt/explain.py for the keys). A docs-mode model reads the text
    as a document (BOS-wrapped), a stream-mode model as a prompt; beyond block_size, the last
    block. The model is not changed."""
    from .explain import explain_model  # (loaded by puregpt/__init__.py before this binds)
    _check_model(model)
    _check_type("text", text, (str,), "a string")
    return explain_model(model, text)
