"""explain: seconds per x-ray page (puregpt.explain.explain + render_page) of a 16-token input,
on the default model and on train-large's shape; each against one plain forward + backward
over the same input (model.loss_and_grads), measured alternately in the same run, so that the
page's cost also reads as a ratio that the machine's load does not move. The page's numbers are
checked against the engine's (attention, logits, loss) before any time counts."""

from __future__ import annotations

import importlib
import json
import random

from bench_train_large import large_setup
from harness import alternate, fmt, md_table, say
from puregpt import model
from puregpt.config import GPTConfig, preset
from puregpt.tokenizer import CharTokenizer

explain_mod = importlib.import_module("puregpt.explain")  # (puregpt.explain is the API's)

FULL = {"explain_rounds": 5}
QUICK = {"explain_rounds": 1}
TARGET_SECONDS = 1.0  # per page on the default model (issue 13)
NAMES_TEXT = "maximilianjones"  # docs mode: BOS + 15 characters = 16 inputs
STREAM_TEXT = "To be, or not to"  # stream mode: 16 characters = 16 inputs


def default_model():
    """The `default` preset's shape over the bundled names' 27 tokens, random weights."""
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    cfg = GPTConfig(vocab_size=tok.vocab_size, **preset("default")["model"])
    return cfg, model.init_params(cfg, random.Random(42)), tok


def check(data, params, cfg) -> None:
    """The page's numbers are the engine's, and its JSON reads back exactly."""
    logits, cache = model.forward(params, cfg, [data["inputs"]])
    assert data["logits"] == logits, "the page's logits are not model.forward's"
    for l in range(cfg.n_layer):
        for head, rows in zip(model.attention_weights(cache, l)[0], data["attention"][l]):
            assert all(row[:i + 1] == shown for i, (row, shown) in enumerate(zip(head, rows)))
    if data["loss"] is not None:
        loss, _ = model.evaluate_loss(params, cfg, [data["inputs"]], [data["targets"]])
        assert abs(loss - data["loss"]) < 1e-12, "the page's loss is not the engine's"
    assert json.loads(explain_mod.to_json(data)) == data


def measure(name, cfg, params, tok, text, docs, rounds) -> dict:
    def page(r):
        say(f"  explain: {name}, page")
        data = explain_mod.explain(params, cfg, tok, text, docs_mode=docs)
        return data, len(explain_mod.render_page(data))

    ids = tok.encode_doc(text) if docs else tok.encode(text)  # as explain reads the text
    inputs, targets = (ids[:-1], ids[1:]) if docs else (ids, ids[1:] + [-1])

    def step(r):
        say(f"  explain: {name}, forward + backward")
        model.loss_and_grads(params, cfg, [inputs], [targets])

    outs, times = alternate({"page": page, "step": step}, rounds)
    data, size = outs["page"][0]
    check(data, params, cfg)
    best, base = min(times["page"]), min(times["step"])
    return {"config": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "block_size",
                                                     "vocab_size")},
            "params": model.num_params(params), "tokens": len(data["inputs"]),
            "mode": "docs" if docs else "stream", "page_bytes": size,
            "seconds_per_page": best, "seconds_all": times["page"],
            "step_seconds": base, "page_over_step": best / base}


def run(sz: dict, args) -> dict:
    rounds = sz["explain_rounds"]
    cfg, params, tok = default_model()
    default = measure("default model", cfg, params, tok, NAMES_TEXT, True, rounds)
    lcfg, _, lparams, _, _, what, corpus = large_setup(sz)
    ltok = corpus.tokenizer
    text = STREAM_TEXT if all(ch in ltok.stoi for ch in STREAM_TEXT) else \
        ltok.decode(corpus.train_ids[:16])
    large = measure("train-large shape", lcfg, lparams, ltok, text, False, rounds)
    large["corpus"] = what
    return {"default": default, "large": large, "target_seconds": TARGET_SECONDS,
            "meets_target": default["seconds_per_page"] < TARGET_SECONDS,
            "weights": "random init (seed 42)", "checked": True}


def table(r: dict) -> str:
    rows = []
    for key, label in (("default", "default model"), ("large", "train-large's shape")):
        m, c = r[key], r[key]["config"]
        rows.append([label, f"{c['n_layer']} x {c['n_embd']}, {c['n_head']} heads, "
                            f"V {c['vocab_size']} ({m['params']:,} params)",
                     f"{m['tokens']} ({m['mode']})", fmt(m["seconds_per_page"]),
                     fmt(m["page_over_step"]) + "x", f"{m['page_bytes']:,}"])
    return ("### explain: seconds per x-ray page (explain + render_page), best of "
            f"{len(r['default']['seconds_all'])}\n\n"
            + md_table(["model", "shape", "tokens", "s / page", "vs one forward + backward",
                        "page bytes"], rows)
            + "\n\nThe page's attention, logits and loss equal the engine's: "
            + fmt(r["checked"]) + ".")


def summary_rows(r: dict) -> list:
    d = r["default"]
    return [["explain", f"x-ray page of 16 tokens, default model ({fmt(d['page_over_step'])}x "
                        f"one forward + backward)", f"{fmt(d['seconds_per_page'])} s",
             f"< {TARGET_SECONDS:g} s", fmt(r["meets_target"])]]
