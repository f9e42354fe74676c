"""The `puregpt` command: train, sample, score, info, explain, plot, export, import-hf (and
`python -m puregpt`)."""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from dataclasses import fields

from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .config import CHOICES, PRESETS, ConfigError, GPTConfig, TrainConfig, preset
from .data import DataError, doc_examples, read_text
from .train import Interrupted, TrainingError

MODEL_HELP = {
    "block_size": "longest context in tokens",
    "n_layer": "transformer blocks",
    "n_embd": "embedding width C",
    "n_head": "attention heads; must divide n_embd",
    "pos": "positions: learned, sinusoidal (fixed) or none added to token embeddings, or rope "
           "(q and k rotated per head)",
    "norm": "normalization: rmsnorm or layernorm",
    "norm_affine": "learnable gain (and bias, for layernorm) in every norm",
    "norm_position": "pre: x + f(norm(x)) (GPT-2); post: norm(x + f(x)) (2017 Transformer)",
    "emb_norm": "normalize the embedding sum before the first block (microgpt)",
    "final_norm": "normalize before lm_head (GPT-2's ln_f)",
    "activation": "MLP activation: relu, gelu (exact erf), gelu_tanh (GPT-2's approximation) "
                  "or silu (x sigmoid(x))",
    "bias": "biases in the attention and MLP linear layers",
    "tie_embeddings": "lm_head shares the token embedding matrix wte",
    "init_std": "standard deviation of the initial weights",
    "scaled_init": "GPT-2 init: attn_wo and mlp_fc2 get init_std / sqrt(2 n_layer)",
    "norm_eps": "epsilon inside the norms' square root",
    "rope_theta": "RoPE's base: pair i of a head turns by position * theta^(-2i/hd) (with --pos "
                  "rope)",
    "mlp": "MLP: plain (fc2 act(fc1 x)) or swiglu (fc2 (silu(gate x) * fc1 x), Llama's; needs "
           "--activation silu)",
    "mlp_hidden": "the MLP's hidden width (auto: 4 n_embd for plain; for swiglu 2/3 of that "
                  "rounded up to a multiple of --mlp-multiple-of)",
    "mlp_multiple_of": "swiglu's automatic hidden width is rounded up to a multiple of this",
    "n_kv_head": "K/V heads, each shared by n_head / n_kv_head query heads (grouped-query "
                 "attention; 1: multi-query; auto: n_head); must divide n_head",
    "qk_norm": "RMSNorm with a gain on each head's q and k before the scores",
}
TRAIN_HELP = {
    "steps": "optimizer steps",
    "batch_size": "documents (docs mode) or windows (stream mode) per micro-batch",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate",
    "beta1": "Adam's first-moment decay",
    "beta2": "Adam's second-moment decay",
    "eps": "Adam's epsilon",
    "weight_decay": "decoupled (AdamW) weight decay on matmul weights (not norms, biases or "
                    "embeddings)",
    "schedule": "learning-rate schedule: linear (to zero), cosine, constant",
    "warmup": "steps of linear warmup",
    "min_lr_frac": "cosine schedule ends at lr * this",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "seed": "random seed for the data order, the split, the initial weights and the windows",
    "data_seed": "seed of the documents' shuffle (split and order) alone, so that runs of "
                 "different --seed share them (-1: use --seed)",
    "mode": "auto, docs (one document per line) or stream (continuous text)",
    "long_docs": "documents longer than block_size: split into windows or truncate",
    "tokenizer": "char (one token per character) or bpe (byte-level BPE learned from the data)",
    "vocab_size": "size of the BPE vocabulary to learn, BOS included (with --tokenizer bpe)",
    "val_fraction": "share of the data held out for validation",
    "eval_every": "steps between validation evaluations (0: only at the end)",
    "eval_tokens": "validation positions per evaluation (0: the whole split)",
    "workers": "processes per step (0: one per core): a batch's sequences are split across "
               "them; with one sequence per step, two split its backward pass and update",
    "log_every": "steps between plain progress lines (0: about 20 per run)",
    "log_format": "full, or microgpt (its exact per-step lines on stdout)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_flags(parser, cls, helps: dict, defaults: dict) -> None:
    """One flag per config field; defaults are None so we know which flags were given. The help
    shows the default the active preset gives (`defaults`: field -> value)."""
    for f in fields(cls):
        if f.name not in helps:  # GPTConfig.vocab_size comes from the data, not a flag
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int}.get(f.type)
        default = defaults[f.name]
        shown = ("on" if default else "off") if f.type == "bool" else f"{default:g}" \
            if f.type == "float" else "auto" if default is None else default
        text = f"{helps[f.name]} (default: {shown})"
        if f.type == "bool":
            parser.add_argument(_flag(f.name), dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=None,
                                choices=CHOICES.get(f.name), help=text,
                                metavar=None if f.name in CHOICES else f.name.upper())


def preset_defaults(name: str) -> tuple[dict, dict]:
    """The model and training settings a preset gives: the dataclasses' defaults, overridden."""
    chosen = preset(name)
    return ({**GPTConfig().to_dict(), **chosen["model"]},
            {**TrainConfig().to_dict(), **chosen["train"]})


def _given(args, helps: dict) -> dict:
    """The config fields (named by a help table) whose flags were given on the command line."""
    return {name: getattr(args, name) for name in helps if getattr(args, name, None) is not None}


def _load(path: str, rows: str = "list"):
    if path == DEFAULT_RUN and not os.path.exists(path):
        raise CheckpointError("no model in ./run (the default): train one with `puregpt "
                              "train`, or name one: a run directory or checkpoint file as the "
                              "first word, or -m RUN")
    path = resolve_checkpoint(path)
    return path, load_checkpoint(path, rows=rows)


# --- naming the model: one convention for every command ----------------------------------------
#
# Every command that uses a model takes it as its first word (a run directory, meaning its best
# checkpoint, or a checkpoint file), or as -m/--model; without either it is ./run. Commands that
# also take texts (score, explain) read the first word as the model only when it names one (a
# checkpoint file, or a directory holding one); otherwise every word is a text.

DEFAULT_RUN = "run"


def _add_model_args(parser, words: str | None = None, words_help: str = "") -> None:
    """The model as -m/--model or the first positional word; `words`: the name of the texts
    that may follow (score, explain)."""
    parser.add_argument("-m", "--model", metavar="RUN", help="run directory or checkpoint file "
                        "(default: ./run; a directory means its best checkpoint)")
    if words is None:
        parser.add_argument("run", nargs="?", metavar="RUN", help="the model, as -m RUN")
    else:
        parser.add_argument("words", nargs="*", metavar=words, help=f"[RUN] {words_help}: "
                            f"a first word that names a run directory or checkpoint file is "
                            f"the model")


def names_a_model(word: str) -> bool:
    """Whether a word names a model: a checkpoint file, or a directory holding one."""
    if os.path.isdir(word):
        return any(os.path.isfile(os.path.join(word, name))
                   for name in ("best.safetensors", "last.safetensors"))
    return os.path.isfile(word) and word.endswith(".safetensors")


def _model_arg(args) -> str:
    """The model of a command without texts: -m RUN or the positional RUN (not both, unless the
    same), else ./run."""
    if args.model is not None and args.run is not None and args.model != args.run:
        raise ConfigError(f"two models given: {args.run} and -m {args.model}; give one")
    return args.model or args.run or DEFAULT_RUN


def _model_and_words(args) -> tuple[str, list[str]]:
    """(model, texts) of a command with texts: see the convention above."""
    words = list(args.words)
    if args.model is not None:
        return args.model, words
    if words and names_a_model(words[0]):
        return words[0], words[1:]
    return DEFAULT_RUN, words


def _is_docs(ckpt) -> bool:
    return ckpt.trainer.get("mode", "docs") == "docs"


# --- commands ----------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from .train import train
    given_model, given_train = _given(args, MODEL_HELP), _given(args, TRAIN_HELP)
    if args.data is not None and not args.data.strip():
        raise ConfigError("--data is empty: name a text file (or leave --data out to train on "
                          "the bundled names)")
    if args.samples is not None and args.samples < 0:
        raise ConfigError(f"--samples must be >= 0, got {args.samples}")
    if args.init_from and given_model:
        raise ConfigError("--init-from takes the model's shape from the checkpoint; do not pass "
                          "model flags with it (got " + ", ".join(_flag(k) for k in given_model)
                          + ")")
    if args.resume:
        if args.preset:
            raise ConfigError("--preset applies to new runs; a resumed run keeps its own settings")
        if given_model:
            raise ConfigError("cannot change the model of a run being resumed (got "
                              + ", ".join(_flag(k) for k in given_model) + ")")
        train(None, None, args.data, args.resume, resume=True, overrides=given_train,
              quiet=args.quiet, samples=args.samples or 0)
        return 0
    chosen = preset(args.preset or "default")
    model_cfg = GPTConfig.from_dict({**chosen["model"], **given_model})
    train_cfg = TrainConfig.from_dict({**chosen["train"], **given_train})
    samples = args.samples
    if samples is None:
        samples = 20 if train_cfg.log_format == "microgpt" else 10
    train(None if args.init_from else model_cfg, train_cfg, args.data, args.out,
          init_from=args.init_from and resolve_checkpoint(args.init_from), force=args.force,
          quiet=args.quiet, samples=samples)
    return 0


def cmd_sample(args) -> int:
    from .model import num_params_of
    from .sample import check_shape, generate_text
    for flag, value in (("-n", args.num_samples), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0: one per core), got {args.workers}")
    if args.compact and args.layout not in (None, "array"):
        raise ConfigError(f"--compact is --layout array: it contradicts --layout {args.layout}")
    path, ckpt = _load(_model_arg(args), rows="array")  # no float objects yet: a fast load
    docs = _is_docs(ckpt)
    rng = random.Random(args.seed)
    shape = dict(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p)
    if not args.greedy:  # bad settings (--temperature 0) fail before any output
        try:
            check_shape(args.temperature, args.top_k, args.top_p)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    ckpt.tokenizer.encode(args.prompt)  # a prompt outside the vocabulary fails before any output
    decoder = None
    layout = "array" if args.compact else args.layout
    n_params = num_params_of(ckpt.config)
    workers = sample_workers(args.workers, n_params)
    if workers != 1 or layout or n_params >= DECODER_FROM:
        from .decode import Decoder
        decoder = Decoder(ckpt.params, ckpt.config, layout, workers, consume=True)
        ckpt.params = None  # the decoder holds what it needs (its own layout): free the rest
        shape["tokens_from"] = decoder.generator()
    try:
        for i in range(args.num_samples):
            sys.stdout.write(args.prompt)
            generate_text(ckpt.params, ckpt.config, ckpt.tokenizer, args.prompt, docs_mode=docs,
                          max_new_tokens=args.max_new_tokens, stop=args.stop, rng=rng,
                          on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
                          **shape)
            sys.stdout.write("\n" if docs else "\n\n" if i + 1 < args.num_samples else "\n")
            sys.stdout.flush()
    finally:
        if decoder is not None:
            decoder.close()
    return 0


# From this many parameters on, `sample` decodes with prepared weights (decode.Decoder), on
# every core unless --workers says otherwise: several times faster there; smaller models keep
# model.forward's exact numbers.
DECODER_FROM = 1_000_000


def sample_workers(requested: int | None, n_params: int) -> int:
    """`sample`'s processes: --workers if given, else every core (0) for models that take the
    decoder's path, one process for smaller ones."""
    if requested is not None:
        return requested
    return 0 if n_params >= DECODER_FROM else 1


def cmd_score(args) -> int:
    from .sample import score_corpus, score_text
    model_path, args.texts = _model_and_words(args)
    path, ckpt = _load(model_path)
    if not args.texts and not args.data:
        raise ConfigError("give documents to score, or --data FILE")
    docs = _is_docs(ckpt)
    for text in args.texts:  # every text is checked before anything is printed
        ids = (ckpt.tokenizer.encode_doc if docs else ckpt.tokenizer.encode)(text)
        if len(ids) < 2:
            raise ConfigError(f"{text!r} is too short to score (it needs two tokens)")
    scores = [score_text(ckpt.params, ckpt.config, ckpt.tokenizer, t, docs) for t in args.texts]
    if args.texts:
        print(f"{'logprob':>10} {'loss/token':>10} {'tokens':>6}  text")
        for text, (logprob, n) in zip(args.texts, scores):
            print(f"{logprob:10.4f} {-logprob / n:10.4f} {n:6d}  {text}")
    if args.data:
        try:
            total, count = score_corpus(ckpt.params, ckpt.config, ckpt.tokenizer,
                                        read_text(args.data), docs)
        except ValueError as e:
            raise DataError(f"{args.data}: {e}") from None
        loss = -total / count
        print(f"{args.data}: {count:,} tokens | mean loss {loss:.4f} nats/token | "
              f"perplexity {math.exp(loss):.3f}")
    return 0


def cmd_info(args) -> int:
    from .model import num_params
    path, ckpt = _load(_model_arg(args))
    cfg, tok = ckpt.config, ckpt.tokenizer
    print(f"checkpoint: {path}")
    print(f"step: {ckpt.step}" + (f" of {ckpt.train_config.steps}" if ckpt.train_config else ""))
    print(f"parameters: {num_params(ckpt.params):,}")
    print("model: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    if ckpt.train_config:
        settings = ckpt.train_config.to_dict()
        if settings["tokenizer"] != "bpe":  # the size of a BPE vocabulary to learn
            del settings["vocab_size"]
        print("training: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if ckpt.trainer.get("data"):
        print(f"data: {ckpt.trainer['data']} ({ckpt.trainer.get('mode')} mode)")
    if ckpt.trainer.get("best_val") is not None:
        print(f"best validation loss: {ckpt.trainer['best_val']:.4f}")
    if tok.kind == "char":
        print(f"vocabulary: {tok.vocab_size} tokens: {''.join(tok.chars)!r} + BOS (id {tok.bos})")
    else:
        print(f"vocabulary: {tok.vocab_size} byte-level BPE tokens (BOS id {tok.bos})")
    return 0


def cmd_plot(args) -> int:
    from .fsutil import atomic_write
    from .plot import read_metrics, render_loss_svg, render_runs_svg
    if not 0.0 <= args.smooth < 1.0:
        raise ConfigError(f"--smooth must be in [0, 1), got {args.smooth}")
    for run in args.run:
        if not os.path.exists(os.path.join(run, "metrics.jsonl")):
            raise DataError(f"{run} has no metrics.jsonl (is it a run directory?)")
    metrics = [read_metrics(os.path.join(run, "metrics.jsonl")) for run in args.run]
    if len(args.run) == 1:
        out = args.output or os.path.join(args.run[0], "loss.svg")
        svg = render_loss_svg(metrics[0], log_scale=args.log_scale, smooth=args.smooth)
    else:  # several runs on one chart: one curve each, labelled by its directory
        if not args.output:
            raise ConfigError("plot of several runs: name the SVG file to write with -o FILE")
        out = args.output
        svg = render_runs_svg([(os.path.normpath(run), [rows])
                               for run, rows in zip(args.run, metrics)],
                              smooth=args.smooth, log_scale=args.log_scale)
    atomic_write(out, [svg.encode()])
    print(out)
    return 0


def cmd_compare(args) -> int:
    from .compare import build_grid, compare, report_runs
    if not 0.0 <= args.smooth < 1.0:
        raise ConfigError(f"--smooth must be in [0, 1), got {args.smooth}")
    if args.runs:  # compare RUN_A RUN_B ...: the report of existing runs
        given = [name for name in ("data", "preset", "tokens") if getattr(args, name)]
        given += list(_given(args, MODEL_HELP)) + list(_given(args, TRAIN_HELP))
        if args.vary or given:
            raise ConfigError("compare RUN...: reports on runs already trained; --vary and "
                              "training flags (got " + ", ".join(
                                  _flag(k) for k in (["vary"] if args.vary else []) + given)
                              + ") belong to a new grid (without RUN arguments)")
        numbers = report_runs(args.runs, args.out, args.baseline, args.smooth)
    else:
        if args.tokens is not None and args.steps is not None:
            raise ConfigError("give --steps or --tokens, not both")
        chosen = preset(args.preset or "default")
        base_model = {**chosen["model"], **_given(args, MODEL_HELP)}
        base_train = {**chosen["train"], **_given(args, TRAIN_HELP)}
        grid = build_grid(base_model, base_train, args.vary or [], args.seeds, args.data,
                          args.tokens, args.baseline)
        numbers = compare(grid, args.out, args.jobs, args.smooth, args.quiet)
    if not args.quiet:  # the ranking and the verdicts (the rest is in the report)
        md = numbers["markdown"]
        print(md[md.index("## Ranking"):md.index("## Loss curves")].rstrip())
    print(f"report: {os.path.join(args.out, 'report.md')} and "
          f"{os.path.join(args.out, 'report.html')}")
    return 0


def cmd_export(args) -> int:
    from .hf import OPTIMIZER_FILE, check_optimizer, export_hf, export_optimizer
    if args.model is not None:  # export -m RUN OUT_DIR
        if len(args.paths) != 1:
            raise ConfigError("export -m RUN takes one more argument: OUT_DIR")
        run, out_dir = args.model, args.paths[0]
    elif len(args.paths) == 2:
        run, out_dir = args.paths
    elif len(args.paths) == 1:
        run, out_dir = DEFAULT_RUN, args.paths[0]
    else:
        raise ConfigError("export takes [RUN] OUT_DIR (RUN defaults to ./run)")
    path, ckpt = _load(run)
    if args.with_optimizer:
        check_optimizer(ckpt)
    export_hf(ckpt, out_dir, args.dtype.upper())
    if args.with_optimizer:
        export_optimizer(ckpt, out_dir, args.dtype.upper())
    elif os.path.exists(os.path.join(out_dir, OPTIMIZER_FILE)):  # a previous export's
        os.remove(os.path.join(out_dir, OPTIMIZER_FILE))
    args.out_dir = out_dir
    print(f"exported {path} to {args.out_dir}: " + ", ".join(sorted(os.listdir(args.out_dir))))
    return 0


def cmd_serve(args) -> int:
    from .serve import serve
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    path, ckpt = _load(_model_arg(args))
    return serve(ckpt, path, args.host, args.port)


def cmd_import_hf(args) -> int:
    from .checkpoint import save_checkpoint
    from .hf import architecture, import_hf
    from .model import num_params
    if os.path.exists(args.out_ckpt) and not args.force:
        raise CheckpointError(f"{args.out_ckpt} already exists: choose another OUT_CKPT (or "
                              f"--force to replace it)")
    ckpt = import_hf(args.hf_dir, rows="array")  # array rows: saved without float objects
    if os.path.dirname(args.out_ckpt):
        os.makedirs(os.path.dirname(args.out_ckpt), exist_ok=True)
    save_checkpoint(args.out_ckpt, ckpt)
    cfg = ckpt.config
    print(f"wrote {args.out_ckpt}: {num_params(ckpt.params):,} parameters "
          f"({architecture(cfg)}), n_layer={cfg.n_layer}"
          f", n_embd={cfg.n_embd}, n_head={cfg.n_head}, block_size={cfg.block_size}, "
          f"{cfg.vocab_size} {ckpt.tokenizer.kind} tokens, {cfg.activation}, "
          f"{'tied' if cfg.tie_embeddings else 'untied'} lm_head, {ckpt.trainer['mode']} mode")
    return 0


def cmd_explain(args) -> int:
    from .explain import explain_model, render_page, to_json
    from .fsutil import atomic_write
    model_path, texts = _model_and_words(args)
    if not texts:
        raise ConfigError("give a TEXT to explain, e.g. puregpt explain run emma")
    if len(texts) > 1 and args.model is None and (os.sep in texts[0] or
                                                  texts[0].endswith(".safetensors")):
        resolve_checkpoint(texts[0])  # a path meant as the model: say it does not exist
    if len(texts) > 1:
        raise ConfigError(f"explain takes one TEXT, got {len(texts)} words: quote a text with "
                          f"spaces (puregpt explain {model_path} \"{' '.join(texts)}\")")
    path, ckpt = _load(model_path)
    data = explain_model(ckpt, texts[0])  # every check (empty text, vocabulary) before writing
    page = render_page(data).encode()
    if args.json:
        atomic_write(args.json, [to_json(data).encode()])
    atomic_write(args.output, [page])
    for note in data["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(args.output + (f" and {args.json}" if args.json else "") + f": {path} on "
          f"{len(data['inputs'])} tokens")
    return 0


# --- parser ------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with mistakes answered in one line (not the whole usage), and a hint where the
    mistake is a common one: a data file given without --data, a misspelt flag."""

    def error(self, message):
        hint = _hint(self, message)
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


def _hint(parser, message: str) -> str:
    import difflib
    if not message.startswith("unrecognized arguments: "):
        return ""
    words = message[len("unrecognized arguments: "):].split()
    flags = [f for a in parser._actions for f in a.option_strings]
    for word in words:
        if not word.startswith("-"):
            if "--data" in flags and (os.path.isfile(word) or word.endswith(".txt")):
                return f"; did you mean --data {word}?"
            continue
        close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
        if close:
            return f"; did you mean {close[0]}?"
    return ""


def build_parser(active_preset: str = "default") -> argparse.ArgumentParser:
    """The command line. `active_preset`: the preset whose settings `train --help` shows as
    the defaults (`puregpt train --preset gpt2 --help` shows gpt2's)."""
    from . import __version__
    p = Parser(prog="puregpt", description="A GPT in pure Python: train it, "
               "sample from it, score text with it, look inside it.")
    p.add_argument("--version", action="version", version=f"puregpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=Parser)

    t = sub.add_parser("train", help="train a model (default: on the bundled names)",
                       description="Train a GPT. Settings come from --preset (default: "
                       "'default'), then from the flags given. The defaults shown are the "
                       f"preset {active_preset!r}'s; `puregpt train --preset NAME --help` "
                       "shows another's.")
    t.add_argument("--data", help="UTF-8 text file: one document per line, or continuous text "
                   "(default: the bundled US first names)")
    t.add_argument("--out", default="run", help="run directory for checkpoints, metrics and "
                   "the loss plot (default: ./run)")
    t.add_argument("--preset", choices=list(PRESETS), help="named settings to start from")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it "
                   "stopped (steps, lr and other optimizer settings may change)")
    t.add_argument("--init-from", metavar="CKPT", help="start from a checkpoint's weights and "
                   "vocabulary with a fresh optimizer (fine-tuning)")
    t.add_argument("--force", action="store_true", help="replace a run already in --out")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.add_argument("--samples", type=int, metavar="N", help="documents to print after training "
                   "(default 10; 20 with --log-format microgpt)")
    model_defaults, train_defaults = preset_defaults(active_preset)
    _add_dataclass_flags(t.add_argument_group(f"model (defaults: preset {active_preset!r})"),
                         GPTConfig, MODEL_HELP, model_defaults)
    _add_dataclass_flags(t.add_argument_group(f"training (defaults: preset {active_preset!r})"),
                         TrainConfig, TRAIN_HELP, train_defaults)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate text from a trained model")
    _add_model_args(s)
    s.add_argument("-n", "--num-samples", type=int, default=10, help="how many (default 10)")
    s.add_argument("--temperature", type=float, default=0.5, help="below 1 sharpens, above 1 "
                   "flattens the distribution (default 0.5)")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens "
                   "(0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely "
                   "tokens whose probability reaches p (nucleus; 1: all)")
    s.add_argument("--greedy", action="store_true", help="always take the most likely token")
    s.add_argument("--prompt", default="", help="text the generation continues")
    s.add_argument("--max-new-tokens", type=int, help="tokens to generate at most (default: "
                   "block_size for documents, 256 for continuous text)")
    s.add_argument("--stop", help="end a sample just before this string")
    s.add_argument("--seed", type=int, help="random seed, for reproducible samples")
    s.add_argument("--workers", type=int, help="processes sharing each token's matrix-vector "
                   "products (0: one per core; same tokens as one process; default: one per "
                   "core from a million parameters on, else 1)")
    s.add_argument("--layout", choices=("tuple", "mixed", "array"), help="how the decoder holds "
                   "the weights: tuple (fastest, ~36 bytes a parameter), mixed (30%% of the rows "
                   "tuples: ~18 bytes, ~0.6x the speed) or array (~7 bytes, ~0.5x, ready "
                   "fastest); default: tuple up to 20M parameters, then mixed on several "
                   "processes, array on one; the same tokens in every layout")
    s.add_argument("--compact", action="store_true", help="the same as --layout array")
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("score", help="log-probability of documents under a model")
    _add_model_args(c, "TEXT", "documents (or, for continuous text, passages) to score")
    c.add_argument("--data", help="report mean loss and perplexity over this file")
    c.set_defaults(func=cmd_score)

    i = sub.add_parser("info", help="describe a checkpoint")
    _add_model_args(i)
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("explain", help="an x-ray page of a model on one text: attention, "
                       "probabilities, gradients",
                       description="Write one self-contained HTML page (no network needed) "
                       "showing the model's real numbers on TEXT: each token's surprisal, every "
                       "head's attention, the next-token probabilities with sampling controls, "
                       "the residual stream, one training step's gradients, the ops in order and "
                       "the token embeddings' PCA. For a stream-mode model TEXT is a prompt.")
    _add_model_args(x, "TEXT", "the text to look at (one argument: quote spaces)")
    x.add_argument("-o", "--output", default="explain.html", help="the page to write "
                   "(default: explain.html)")
    x.add_argument("--json", metavar="FILE", help="also write the page's numbers as JSON")
    x.set_defaults(func=cmd_explain)

    pl = sub.add_parser("plot", help="draw a run's loss curves as SVG (or several runs')")
    pl.add_argument("run", nargs="+", metavar="RUN", help="run directory (several: one chart)")
    pl.add_argument("--log-scale", action="store_true", help="logarithmic loss axis")
    pl.add_argument("--smooth", type=float, default=0.0, metavar="W", help="EMA smoothing of "
                    "the train loss, weight W on the past in [0, 1) (default 0: raw)")
    pl.add_argument("-o", "--output", help="SVG file (default for one run: DIR/loss.svg)")
    pl.set_defaults(func=cmd_plot)

    cm = sub.add_parser(
        "compare", help="train variants over several seeds side by side, and report what "
        "each difference is worth",
        description="Train every combination of the --vary values (over the settings of "
        "--preset and the other flags), each with --seeds seeds, as run directories under "
        "--out, --jobs at a time; then write OUT/report.md and OUT/report.html: a ranking, "
        "each config against the baseline (Welch's t-test, 95% interval), the loss curves "
        "and samples. The same command again resumes. With RUN arguments instead: the report "
        "of runs already trained.")
    cm.add_argument("runs", nargs="*", metavar="RUN", help="existing run directories to report "
                    "on (runs differing only in seed are one config)")
    cm.add_argument("--vary", action="append", metavar="FIELD=V1,V2", help="a setting and its "
                    "values (repeatable: the grid is every combination), e.g. "
                    "--vary norm-position=pre,post")
    cm.add_argument("--seeds", type=int, default=3, help="seeds per config (default 3)")
    cm.add_argument("--tokens", type=int, help="token budget per run instead of --steps (each "
                    "config's steps: about this many training positions)")
    cm.add_argument("--jobs", type=int, default=0, help="runs at once (default 0: one per "
                    "core; each run uses one process)")
    cm.add_argument("--baseline", metavar="FIELD=VALUE", help="the config the others are "
                    "compared with (default: the first value of each --vary)")
    cm.add_argument("--smooth", type=float, default=0.8, metavar="W", help="EMA smoothing of "
                    "the curves in [0, 1) (default 0.8)")
    cm.add_argument("--data", help="UTF-8 text file (default: the bundled US first names)")
    cm.add_argument("--out", default="compare", help="directory of the runs and the report "
                    "(default: ./compare)")
    cm.add_argument("--preset", choices=list(PRESETS), help="named settings to start from")
    cm.add_argument("--quiet", action="store_true", help="no progress output")
    _add_dataclass_flags(cm.add_argument_group(f"model (defaults: preset {active_preset!r})"),
                         GPTConfig, MODEL_HELP, model_defaults)
    _add_dataclass_flags(cm.add_argument_group(f"training (defaults: preset {active_preset!r})"),
                         TrainConfig, TRAIN_HELP, train_defaults)
    cm.set_defaults(func=cmd_compare)

    e = sub.add_parser("export", help="write a model as a Hugging Face GPT-2 or Llama "
                       "directory",
                       description="Write a GPT-2-shaped model (e.g. --preset gpt2) as a "
                       "directory that transformers' GPT2LMHeadModel and AutoTokenizer load, or "
                       "a llama-shaped one (--preset llama) as a LlamaForCausalLM: "
                       "config.json, model.safetensors and the tokenizer files.")
    e.add_argument("-m", "--model", metavar="RUN", help="run directory or checkpoint file "
                   "(default: ./run; a directory means its best checkpoint)")
    e.add_argument("paths", nargs="+", metavar="[RUN] OUT_DIR", help="the model (as -m RUN; "
                   "default ./run), then the directory to create (or a previous export of the "
                   "same kind to replace)")
    e.add_argument("--format", default="hf", choices=["hf"], help="hf: Hugging Face "
                   "transformers GPT-2 or Llama, as the model's shape says (the only format "
                   "so far)")
    e.add_argument("--dtype", default="f32", choices=["f32", "f64"], type=str.lower,
                   help="precision of the weights in model.safetensors (default f32; f64 keeps "
                   "puregpt's weights bit for bit)")
    e.add_argument("--with-optimizer", action="store_true", help="also write the AdamW moments "
                   "and step count as optimizer.safetensors (torch.optim.AdamW's state names), "
                   "so examples/continue_in_pytorch.py continues with the same optimizer state")
    e.set_defaults(func=cmd_export)

    ih = sub.add_parser("import-hf", help="turn a Hugging Face GPT-2 or Llama directory into "
                        "a puregpt checkpoint",
                        description="Read a GPT-2 or Llama directory (config.json, "
                        "model.safetensors in "
                        "F32, F16, BF16 or F64, and vocab.json + merges.txt or tokenizer.json) "
                        "and write a checkpoint that sample, score and train --init-from use.")
    ih.add_argument("hf_dir", metavar="HF_DIR", help="the Hugging Face model directory")
    ih.add_argument("out_ckpt", metavar="OUT_CKPT", help="the puregpt checkpoint file to write")
    ih.add_argument("--force", action="store_true", help="replace OUT_CKPT if it exists")
    ih.set_defaults(func=cmd_import_hf)

    sv = sub.add_parser("serve", help="the x-ray page, live: generate and look inside, in a "
                        "browser", description="Serve the model's x-ray page live from a local "
                        "HTTP server: type a prompt, watch the tokens stream in as they are "
                        "sampled, then click any token to see its attention and alternatives. "
                        "It listens on 127.0.0.1 (this machine only) unless --host says "
                        "otherwise; Ctrl-C stops it.")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                    "127.0.0.1: this machine only; 0.0.0.0: every network interface)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free "
                    "port, printed)")
    sv.set_defaults(func=cmd_serve)
    return p


def _preset_in(argv: list[str]) -> str:
    """The --preset a command line names (for the defaults its help shows), else "default"."""
    for i, word in enumerate(argv):
        value = argv[i + 1] if word == "--preset" and i + 1 < len(argv) else \
            word[len("--preset="):] if word.startswith("--preset=") else None
        if value in PRESETS:
            return value
    return "default"


def parse(parser, argv: list[str]):
    """The command line's namespace. Within a command, options and words may come in any order
    (`export RUN --dtype f64 OUT_DIR`, `score emma -m run anna`): the command's own parser reads
    them intermixed."""
    commands = parser._subparsers._group_actions[0].choices  # name -> the command's parser
    for i, word in enumerate(argv):
        if word in commands:
            args = commands[word].parse_intermixed_args(argv[i + 1:])
            args.command = word
            return args
        if not word.startswith("-"):
            break
    return parser.parse_args(argv)  # no command: argparse's own message (or --help)


def _reported_errors() -> tuple:
    """The errors main reports as one line. A WorkerError (a worker process died or failed; its
    message says how) can only come from puregpt.parallel once imported: a one-process run
    never imports it (multiprocessing and shared memory: ~10 ms of every start)."""
    parallel = sys.modules.get("puregpt.parallel")
    return (ConfigError, DataError, CheckpointError, TrainingError, ValueError, OSError) + (
        (parallel.WorkerError,) if parallel else ())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse(build_parser(_preset_in(argv)), argv)
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `puregpt sample | head` closed the pipe: not an error
        sys.stderr.close()
        return 0
    except _reported_errors() as e:  # (evaluated when an exception is raised)
        print(f"puregpt: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
