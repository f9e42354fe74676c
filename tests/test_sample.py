"""Sampling and scoring (project issue 4, items 2 and 3).

shape_probs / pick: top-k keeps exactly the k most likely tokens (ties: the lower id), top-p keeps
the smallest most-likely set whose mass reaches p (checked against a brute force over all subsets),
greedy is the argmax and the T -> 0 limit, and the empirical frequencies of many draws match the
shaped distributions (chi-square at significance 0.001 with fixed seeds, so the tests are
deterministic). generate / generate_text: BOS ends a document and is never emitted,
max_new_tokens, prompts (the model is conditioned on them), stop strings, the sliding context
window (against a full forward over the last block_size tokens every step) and streaming.
The CLI: `puregpt sample` (seeds, prompts, errors, incremental output) and `puregpt score`
(against a manual log-softmax sum, windows for long documents, --data, errors).

KV-cache decoding against full forwards is tested in tests/test_kv_cache.py.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import subprocess
import sys

import pytest

from puregpt import cli, model, sample
from puregpt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from puregpt.config import GPTConfig
from puregpt.sample import generate, generate_text, pick, score_ids, shape_probs
from puregpt.tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fixed logits vector with ties: ids 2 and 4 share the largest logit, ids 3 and 7 another one.
# Most likely first (ties: lower id first): 2, 4, 0, 6, 3, 7, 1, 5.
LOGITS = [1.3, -0.2, 2.1, 0.4, 2.1, -1.5, 0.9, 0.4]
ORDER = [2, 4, 0, 6, 3, 7, 1, 5]
# No tie at the top, for the limits where the argmax must be unique.
LOGITS_UNIQUE_MAX = [1.3, -0.2, 2.9, 0.4, 2.1, -1.5, 0.9, 0.4]

# Upper 0.001 quantiles of the chi-square distribution by degrees of freedom (the chance that a
# correct sampler exceeds them is 0.1%; with fixed seeds a test either always passes or never).
CHI2_CRIT_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458,
                   7: 24.322, 8: 26.124, 9: 27.877}
DRAWS = 30_000


def softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = math.fsum(e)
    return [v / s for v in e]


def support(probs):
    return {i for i, p in enumerate(probs) if p > 0}


def log_softmax_at(z, y):
    m = max(z)
    return z[y] - m - math.log(math.fsum(math.exp(v - m) for v in z))


def chi_square(counts, probs, n):
    """Pearson's statistic and degrees of freedom; cells expected below 5 are pooled, and cells of
    probability 0 must be empty (they are checked, not counted)."""
    for i, p in enumerate(probs):
        if p == 0:
            assert counts[i] == 0, f"token {i} has probability 0 but was drawn {counts[i]} times"
    cells = sorted(((p * n, counts[i]) for i, p in enumerate(probs) if p > 0))
    pooled = []
    exp_acc, obs_acc = 0.0, 0
    for e, o in cells:  # ascending expected counts: pool the small ones together
        exp_acc, obs_acc = exp_acc + e, obs_acc + o
        if exp_acc >= 5:
            pooled.append((exp_acc, obs_acc))
            exp_acc, obs_acc = 0.0, 0
    if exp_acc:  # leftover small mass joins the last cell
        e, o = pooled.pop() if pooled else (0.0, 0)
        pooled.append((e + exp_acc, o + obs_acc))
    stat = sum((o - e) ** 2 / e for e, o in pooled)
    return stat, len(pooled) - 1


def draw_counts(logits, seed, n=DRAWS, **shape):
    rng = random.Random(seed)
    counts = [0] * len(logits)
    for _ in range(n):
        counts[pick(logits, rng, **shape)] += 1
    return counts


def assert_matches(counts, probs, label):
    stat, df = chi_square(counts, probs, sum(counts))
    assert df >= 1
    assert stat < CHI2_CRIT_0_001[df], (
        f"{label}: chi-square {stat:.2f} >= {CHI2_CRIT_0_001[df]} (df {df}, p = 0.001); "
        f"counts {counts}, expected {[round(p * sum(counts), 1) for p in probs]}")


class Recorder:
    """Wraps sample.pick to record the logits of every draw and the token drawn."""

    def __init__(self, monkeypatch):
        self.logits, self.tokens = [], []
        real = sample.pick

        def recording_pick(logits, *args, **kw):
            token = real(logits, *args, **kw)
            self.logits.append(list(logits))
            self.tokens.append(token)
            return token

        monkeypatch.setattr(sample, "pick", recording_pick)


# --- models and checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """microgpt's model shape trained for 200 single-name steps on the bundled names (docs
    mode, ~3 s)."""
    out = str(tmp_path_factory.mktemp("run") / "names")
    subprocess.run([sys.executable, "-m", "puregpt", "train", "--steps", "200", "--out", out,
                    "--n-embd", "16", "--batch-size", "1", "--schedule", "linear",
                    "--warmup", "0", "--quiet", "--samples", "0"], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def trained(trained_run):
    return load_checkpoint(os.path.join(trained_run, "best.safetensors"))


def tiny_model(chars, seed=0, **overrides):
    tok = CharTokenizer(chars)
    cfg = GPTConfig(**{**dict(vocab_size=tok.vocab_size, block_size=8, n_layer=2, n_embd=16,
                              n_head=4, init_std=0.5), **overrides})
    return cfg, tok, model.init_params(cfg, random.Random(seed))


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory):
    """A random 2-layer stream-mode checkpoint with block_size 8 (no training needed)."""
    cfg, tok, params = tiny_model(sorted(set("abcde \n")), seed=3)
    path = str(tmp_path_factory.mktemp("stream") / "last.safetensors")
    save_checkpoint(path, Checkpoint(cfg, tok, params, trainer={"mode": "stream"}))
    return path


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- top-k -------------------------------------------------------------------------------------


def test_top_k_support_is_the_k_most_likely_with_ties_to_the_lower_id():
    for T in (0.5, 1.0, 2.0):
        for k in range(1, len(LOGITS) + 1):
            probs = shape_probs(LOGITS, temperature=T, top_k=k)
            assert support(probs) == set(ORDER[:k]), (T, k)
            assert shape_probs(LOGITS, temperature=T, top_k=k) == probs  # deterministic
            full = softmax([z / T for z in LOGITS])
            kept = math.fsum(full[i] for i in ORDER[:k])
            for i in ORDER[:k]:  # the kept probabilities, renormalized
                assert abs(probs[i] - full[i] / kept) < 1e-12
        # k = 0 and k >= V keep everything
        for k in (0, len(LOGITS), len(LOGITS) + 5):
            assert support(shape_probs(LOGITS, temperature=T, top_k=k)) == set(range(8))
    # the tie at the top: k = 1 keeps id 2, never id 4; the tie 3/7 at k = 5 keeps id 3
    assert support(shape_probs(LOGITS, top_k=1)) == {2}
    assert support(shape_probs(LOGITS, top_k=5)) == {2, 4, 0, 6, 3}


def test_top_k_never_draws_outside_the_k_most_likely():
    for k in (1, 2, 3, 5, 7):
        for T in (0.5, 2.0):
            rng = random.Random(100 + k)
            drawn = {pick(LOGITS, rng, temperature=T, top_k=k) for _ in range(3000)}
            assert drawn == set(ORDER[:k]), (k, T, drawn)  # inside, and all of it reachable


# --- top-p -------------------------------------------------------------------------------------


# "Reaches p" allows the rounding of float probabilities: a mass within 1e-9 below p reaches it
# (sample.TOP_P_TOLERANCE), so that p = 0.8 keeps {0.5, 0.3} although 0.5 + 0.29999999999999993
# rounds below 0.8.
REACH_TOL = 1e-9


def brute_force_nucleus(probs, p, tol=REACH_TOL):
    """Smallest set of tokens whose mass reaches p, by enumerating all subsets by size; among the
    smallest ones, the most probable, then (ties of equal probabilities) the lowest ids."""
    ids = [i for i, q in enumerate(probs) if q > 0]
    for r in range(1, len(ids) + 1):
        reach = [c for c in itertools.combinations(ids, r)
                 if math.fsum(probs[i] for i in c) >= p - tol]
        if reach:
            return set(max(reach, key=lambda c: (math.fsum(probs[i] for i in c),
                                                 [-i for i in c])))
    raise AssertionError("no subset reaches p")


def cumulative_masses(probs):
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    return [math.fsum(probs[i] for i in order[:m]) for m in range(1, len(probs) + 1)]


def test_top_p_support_is_the_smallest_set_reaching_p_by_brute_force():
    rng = random.Random(5)
    logit_vectors = [LOGITS, LOGITS_UNIQUE_MAX] + [[rng.gauss(0, 1.5) for _ in range(8)]
                                                   for _ in range(6)]
    checked = 0
    for logits in logit_vectors:
        for T in (0.5, 1.0, 2.0):
            for k in (0, 3, 6):
                base = shape_probs(logits, temperature=T, top_k=k)  # renormalized top-k
                masses = cumulative_masses(base)
                for p in [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.99] + \
                         [rng.uniform(0.01, 0.999) for _ in range(4)]:
                    if min(abs(p - m) for m in masses) < 1e-6:
                        continue  # on a boundary: the edge-case tests below pin those exactly
                    probs = shape_probs(logits, temperature=T, top_k=k, top_p=p)
                    want = brute_force_nucleus(base, p)
                    assert support(probs) == want, (logits, T, k, p)
                    kept = math.fsum(base[i] for i in want)
                    for i in want:  # renormalized over the nucleus
                        assert abs(probs[i] - base[i] / kept) < 1e-12
                    checked += 1
    assert checked > 500


@pytest.mark.parametrize("dist, p, size", [
    ([0.05, 0.15, 0.3, 0.5], 0.5, 1),
    ([0.05, 0.15, 0.3, 0.5], 0.8, 2),  # 0.5 + 0.29999999999999993 rounds below 0.8
    ([0.05, 0.15, 0.3, 0.5], 0.95, 3),
    ([0.3, 0.5, 0.15, 0.05], 0.8, 2),
    ([0.1, 0.2, 0.3, 0.4], 0.7, 2),
    ([0.1, 0.2, 0.3, 0.4], 0.9, 3),
    ([0.125, 0.5, 0.125, 0.25], 0.75, 2),  # dyadic: exact in floating point
    ([0.125, 0.5, 0.125, 0.25], 0.875, 3),
])
def test_top_p_equal_to_a_cumulative_mass_keeps_exactly_that_prefix(dist, p, size):
    logits = [math.log(q) for q in dist]
    order = sorted(range(len(dist)), key=lambda i: -dist[i])
    assert support(shape_probs(logits, top_p=p)) == set(order[:size])
    # a hair above the boundary needs one more token
    assert support(shape_probs(logits, top_p=p + 1e-6)) == set(order[:size + 1])
    # ties: the 0.125 pair keeps the lower id
    if dist.count(0.125) == 2:
        assert 0 in support(shape_probs(logits, top_p=0.875))


def test_top_p_one_keeps_everything_and_tiny_p_keeps_the_argmax():
    for T in (0.5, 1.0, 2.0):
        full = shape_probs(LOGITS, temperature=T)
        assert shape_probs(LOGITS, temperature=T, top_p=1.0) == full
        assert support(full) == set(range(8))
        for i, q in enumerate(softmax([z / T for z in LOGITS])):
            assert abs(full[i] - q) < 1e-12
        for tiny in (1e-12, 1e-6, 0.01):
            assert shape_probs(LOGITS, temperature=T, top_p=tiny) == [
                1.0 if i == 2 else 0.0 for i in range(8)]  # tie at the top: the lower id
            assert support(shape_probs(LOGITS_UNIQUE_MAX, temperature=T, top_p=tiny)) == {2}
    # p = 1 with top-k is plain top-k
    assert shape_probs(LOGITS, top_k=3, top_p=1.0) == shape_probs(LOGITS, top_k=3)
    rng = random.Random(1)
    assert {pick(LOGITS, rng, top_p=1e-9) for _ in range(500)} == {2}


def test_top_k_then_top_p_is_top_p_of_the_renormalized_top_k():
    dist = [0.1, 0.4, 0.2, 0.3]
    logits = [math.log(q) for q in dist]
    # top-2 renormalized: {1: 4/7, 3: 3/7}; p = 0.5 is reached by id 1 alone (4/7 >= 0.5),
    # whereas top-p on the full distribution would need ids 1 and 3 (0.4 < 0.5)
    assert support(shape_probs(logits, top_p=0.5)) == {1, 3}
    assert shape_probs(logits, top_k=2, top_p=0.5) == [0.0, 1.0, 0.0, 0.0]
    # p = 0.6: 4/7 < 0.6, so both; the result is the renormalized top-2 itself
    probs = shape_probs(logits, top_k=2, top_p=0.6)
    assert abs(probs[1] - 4 / 7) < 1e-12 and abs(probs[3] - 3 / 7) < 1e-12
    # top-3 renormalized: {1: 4/9, 3: 3/9, 2: 2/9}; p = 7/9 exactly the first two
    assert support(shape_probs(logits, top_k=3, top_p=7 / 9)) == {1, 3}
    assert support(shape_probs(logits, top_k=3, top_p=7 / 9 + 1e-6)) == {1, 2, 3}


def test_invalid_shaping_settings_raise():
    for kw in (dict(temperature=0.0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0),
               dict(top_p=1.5), dict(top_p=float("nan"))):
        with pytest.raises(ValueError):
            shape_probs(LOGITS, **kw)


# --- greedy, temperature -> 0, seeds -----------------------------------------------------------


def test_greedy_is_the_argmax_and_deterministic():
    rng = random.Random(0)
    for _ in range(300):
        logits = [rng.gauss(0, 2) for _ in range(rng.randrange(2, 30))]
        want = max(range(len(logits)), key=lambda i: (logits[i], -i))
        got = {pick(logits, random.Random(s), greedy=True, temperature=0.3, top_k=1, top_p=0.5)
               for s in range(3)}
        assert got == {want}
    assert pick(LOGITS, random.Random(0), greedy=True) == 2  # tie at the top: the lower id


def test_temperature_to_zero_approaches_greedy():
    temps = [4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01, 1e-3]
    p_max = [shape_probs(LOGITS_UNIQUE_MAX, temperature=T)[2] for T in temps]
    for hotter, colder in zip(p_max, p_max[1:]):
        assert colder >= hotter
        assert colder > hotter or colder == 1.0  # strictly, until it saturates
    assert p_max[0] < 0.5 and p_max[-1] > 1 - 1e-12
    rng = random.Random(2)
    assert all(pick(LOGITS_UNIQUE_MAX, rng, temperature=1e-3) == 2 for _ in range(5000))
    # with a tie at the top, T -> 0 splits the mass evenly between the tied ids
    probs = shape_probs(LOGITS, temperature=1e-3)
    assert abs(probs[2] - 0.5) < 1e-12 and abs(probs[4] - 0.5) < 1e-12


def test_a_fixed_seed_reproduces_draws_and_generations(trained):
    draws = [[pick(LOGITS, rng, temperature=1.5, top_p=0.9) for _ in range(200)]
             for rng in (random.Random(7), random.Random(7), random.Random(8))]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    ck = trained

    def names(seed):
        rng = random.Random(seed)
        return [generate_text(ck.params, ck.config, ck.tokenizer, rng=rng, temperature=0.8)
                for _ in range(8)]

    assert names(7) == names(7)
    assert names(7) != names(8)


def test_low_temperature_generation_equals_greedy(trained, monkeypatch):
    ck = trained
    context = [ck.tokenizer.bos] + ck.tokenizer.encode("ma")
    rec = Recorder(monkeypatch)
    greedy = list(generate(ck.params, ck.config, context, 12, random.Random(0), greedy=True))
    gaps = [sorted(z)[-1] - sorted(z)[-2] for z in rec.logits]
    # precondition: no near-tie on the greedy path, so each step leaves the argmax with
    # probability below exp(-gap / T) < exp(-15) ~ 3e-7
    assert min(gaps) > 0.015
    cold = list(generate(ck.params, ck.config, context, 12, random.Random(1), temperature=1e-3,
                         stop_token=None))
    assert cold[:len(greedy)] == greedy


def test_cli_seed_reproduces_stdout(trained_run):
    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "puregpt", "sample", trained_run, *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    first, again, other = run("--seed", "7"), run("--seed", "7"), run("--seed", "8")
    assert first == again
    assert first != other
    assert len(first.splitlines()) == 10  # default -n 10, one document per line


# --- distributions -----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_frequencies_match_softmax_at_temperature(T):
    counts = draw_counts(LOGITS, seed=int(T * 100), temperature=T)
    assert_matches(counts, softmax([z / T for z in LOGITS]), f"T={T}")


def test_the_chi_square_check_rejects_a_wrong_distribution():
    """The test has power: draws at T = 1 do not pass for softmax(logits / 1.2)."""
    counts = draw_counts(LOGITS, seed=100, temperature=1.0)
    stat, df = chi_square(counts, softmax([z / 1.2 for z in LOGITS]), DRAWS)
    assert stat > CHI2_CRIT_0_001[df]


@pytest.mark.parametrize("T, k, p", [(1.0, 2, 1.0), (1.0, 4, 1.0), (2.0, 6, 1.0),
                                     (1.0, 0, 0.6), (1.0, 0, 0.9), (2.0, 0, 0.75),
                                     (0.5, 5, 0.9), (2.0, 6, 0.8)])
def test_frequencies_match_truncated_renormalized_distributions(T, k, p):
    full = softmax([z / T for z in LOGITS])
    order = sorted(range(8), key=lambda i: (-full[i], i))
    kept = order[:k] if k else order
    mass_k = math.fsum(full[i] for i in kept)
    base = [full[i] / mass_k if i in kept else 0.0 for i in range(8)]
    nucleus = brute_force_nucleus(base, p) if p < 1 else set(kept)
    mass_p = math.fsum(base[i] for i in nucleus)
    want = [base[i] / mass_p if i in nucleus else 0.0 for i in range(8)]
    counts = draw_counts(LOGITS, seed=1000 + k * 10 + int(p * 100), temperature=T, top_k=k,
                         top_p=p)
    assert support(counts) == nucleus  # outside: never; inside: drawn (all have mass > 1%)
    assert_matches(counts, want, f"T={T} top_k={k} top_p={p}")


# --- generation --------------------------------------------------------------------------------


def test_generation_stops_at_bos_and_never_yields_it(trained, monkeypatch):
    ck = trained
    bos = ck.tokenizer.bos
    stopped = 0
    for seed in range(30):
        rec = Recorder(monkeypatch)
        out = list(generate(ck.params, ck.config, [bos], 40, random.Random(seed),
                            stop_token=bos))
        assert bos not in out
        if len(out) < 40:  # ended early: because BOS was drawn, right after the last token
            assert rec.tokens == out + [bos]
            stopped += 1
        else:
            assert rec.tokens == out
    assert stopped >= 25  # names end: the trained model draws BOS well before 40 characters
    # generate_text in docs mode: the text is what came before BOS, without it
    for seed in range(10):
        rec = Recorder(monkeypatch)
        text = generate_text(ck.params, ck.config, ck.tokenizer, rng=random.Random(seed))
        assert rec.tokens[-1] == bos and bos not in rec.tokens[:-1]
        assert text == ck.tokenizer.decode(rec.tokens[:-1]) and text


def test_generation_respects_max_new_tokens(trained, stream_run, monkeypatch):
    ck = trained
    for n in (0, 1, 5, 16, 17, 40):
        out = list(generate(ck.params, ck.config, [ck.tokenizer.bos], n, random.Random(n),
                            stop_token=None))
        assert len(out) == n
    for c, docs in ((ck, True), (load_checkpoint(stream_run), False)):
        for n in (0, 3, 8, 25):
            for seed in range(4):
                rec = Recorder(monkeypatch)
                text = generate_text(c.params, c.config, c.tokenizer, prompt="a",
                                     docs_mode=docs, max_new_tokens=n, rng=random.Random(seed),
                                     temperature=2.0)
                assert len(rec.tokens) <= n  # never a draw beyond max_new_tokens
                # n characters, or fewer because BOS was drawn
                assert len(text) == n or rec.tokens[-1] == c.tokenizer.bos
    # the default in docs mode is block_size tokens, which hot samples reach
    long_names = [generate_text(ck.params, ck.config, ck.tokenizer, rng=random.Random(s),
                                temperature=3.0) for s in range(30)]
    assert max(len(t) for t in long_names) == ck.config.block_size


def test_prompt_conditions_the_model(trained, stream_run, monkeypatch):
    # docs mode: the context is BOS + prompt; greedy equals a manual greedy loop of full forwards
    ck = trained
    tok = ck.tokenizer
    for prompt in ("ma", "chr", "z"):
        rec = Recorder(monkeypatch)
        text = generate_text(ck.params, ck.config, tok, prompt=prompt, greedy=True)
        ids = [tok.bos] + tok.encode(prompt)
        manual = []
        while len(manual) < ck.config.block_size:
            z = model.forward(ck.params, ck.config, [ids[-ck.config.block_size:]])[0][-1]
            assert max(abs(a - b) for a, b in zip(z, rec.logits[len(manual)])) < 1e-12
            nxt = max(range(len(z)), key=z.__getitem__)
            if nxt == tok.bos:
                break
            manual.append(nxt)
            ids.append(nxt)
        assert text == tok.decode(manual)
    # the prompt changes the distribution of the first new token
    first = {p: model.forward(ck.params, ck.config, [[tok.bos] + tok.encode(p)])[0][-1]
             for p in ("", "q", "mar")}
    assert first[""] != first["q"] != first["mar"]
    # stream mode: the context is the prompt itself, without BOS
    st = load_checkpoint(stream_run)
    rec = Recorder(monkeypatch)
    generate_text(st.params, st.config, st.tokenizer, prompt="abc d", docs_mode=False,
                  max_new_tokens=3, rng=random.Random(0))
    z = model.forward(st.params, st.config, [st.tokenizer.encode("abc d")])[0][-1]
    assert max(abs(a - b) for a, b in zip(z, rec.logits[0])) < 1e-12


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
@pytest.mark.parametrize("greedy", [True, False])
def test_sliding_window_equals_a_forward_over_the_last_block(pos, greedy, monkeypatch):
    cfg, tok, params = tiny_model(list("abcdef"), seed=11, pos=pos)
    B = cfg.block_size
    for context in ([tok.bos], [0, 3, 5], [i % 6 for i in range(2 * B + 3)]):  # the last > B
        rec = Recorder(monkeypatch)
        n_new = 3 * B
        out = list(generate(params, cfg, context, n_new, random.Random(4), greedy=greedy,
                            temperature=1.3, stop_token=None))
        assert len(out) == n_new and len(rec.logits) == n_new
        tokens, rng, manual = list(context), random.Random(4), []
        for step in range(n_new):  # recompute the whole window every step
            z = model.forward(params, cfg, [tokens[-B:]])[0][-1]
            err = max(abs(a - b) for a, b in zip(z, rec.logits[step]))
            assert err < 1e-12, (context, step, err)
            if greedy:
                nxt = max(range(len(z)), key=z.__getitem__)
            else:
                nxt = pick(rec.logits[step], rng, temperature=1.3)
            manual.append(nxt)
            tokens.append(nxt)
        assert manual == out
        assert len(context) + n_new > 2 * B  # the window slid well past block_size


def scripted_generate(token_ids):
    def fake(params, config, context, max_new_tokens, rng, stop_token=None, **shape):
        for t in token_ids[:max_new_tokens]:
            if t == stop_token:
                return
            yield t
    return fake


@pytest.mark.parametrize("stream, stop, want", [
    ("abcdcdab", "cd", "ab"),
    ("abcdcdab", "d", "abc"),
    ("aab", "ab", "a"),
    ("abcabd", "abd", "abc"),  # a partial match ("ab" of "abc") that does not complete
    ("abcab", "abd", "abcab"),  # a partial match at the end: flushed
    ("ab", "zz", "ab"),
    ("abc", None, "abc"),
    ("cdab", "cd", ""),
])
def test_stop_string_ends_just_before_it_and_streaming_agrees(stream, stop, want, monkeypatch):
    cfg, tok, params = tiny_model(list("abcd"))
    monkeypatch.setattr(sample, "generate", scripted_generate(tok.encode(stream)))
    pieces = []
    text = generate_text(params, cfg, tok, stop=stop, on_text=pieces.append, max_new_tokens=50)
    assert text == want
    assert "".join(pieces) == want  # nothing of the stop string was streamed
    assert all(pieces)
    # BOS ends the text as well; text after BOS is never produced
    monkeypatch.setattr(sample, "generate", scripted_generate(tok.encode("ca") + [tok.bos, 3]))
    assert generate_text(params, cfg, tok, stop=stop) == "ca"


def test_stop_string_with_a_real_model_truncates_the_unstopped_sample(trained):
    ck = trained
    hits = 0
    for seed in range(40):
        full = generate_text(ck.params, ck.config, ck.tokenizer, rng=random.Random(seed))
        for stop in ("an", "e", "lia"):
            pieces = []
            cut = generate_text(ck.params, ck.config, ck.tokenizer, rng=random.Random(seed),
                                stop=stop, on_text=pieces.append)
            assert cut == (full[:full.index(stop)] if stop in full else full)
            assert "".join(pieces) == cut
            hits += stop in full
    assert hits >= 10


def test_streaming_pieces_concatenate_to_the_text(trained, stream_run):
    ck = trained
    st = load_checkpoint(stream_run)
    for seed in range(15):
        for c, docs, prompt in ((ck, True, ""), (ck, True, "ka"), (st, False, "ab "),
                                (st, False, "")):
            pieces = []
            text = generate_text(c.params, c.config, c.tokenizer, prompt=prompt, docs_mode=docs,
                                 rng=random.Random(seed), on_text=pieces.append,
                                 max_new_tokens=20)
            assert "".join(pieces) == text
            assert len(pieces) == len(text)  # char tokenizer: one piece per character, live


# --- the sample command ------------------------------------------------------------------------


class RecordingStdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.events = []

    def write(self, s):
        self.events.append(("write", s))
        return super().write(s)

    def flush(self):
        self.events.append(("flush",))


@pytest.mark.parametrize("prompt", ["", "ma"])
def test_cli_sample_streams_what_generate_text_produces(trained_run, trained, prompt,
                                                        monkeypatch):
    ck = trained
    rng, expected = random.Random(7), []
    for _ in range(4):
        pieces = []
        generate_text(ck.params, ck.config, ck.tokenizer, prompt, rng=rng, temperature=0.5,
                      on_text=pieces.append)
        expected.append(pieces)
    out = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["sample", trained_run, "--seed", "7", "-n", "4", "--prompt", prompt]) == 0
    writes = [e[1] for e in out.events if e[0] == "write"]
    want = [w for pieces in expected for w in ([prompt] + pieces + ["\n"])]
    assert writes == want  # prompt, then every piece as it is produced, then the line break
    # each piece is flushed as soon as it is written
    for i, e in enumerate(out.events):
        if e[0] == "write" and e[1] not in (prompt, "\n"):
            assert out.events[i + 1] == ("flush",)
    assert out.getvalue() == "".join(prompt + "".join(p) + "\n" for p in expected)
    assert all(line.startswith(prompt) for line in out.getvalue().splitlines())


def test_cli_sample_prompt_stop_and_stream_separators(trained_run, stream_run, capsys):
    code, out, _ = run_cli(["sample", trained_run, "--greedy", "-n", "2", "--prompt", "jo"],
                           capsys)
    assert code == 0
    lines = out.split("\n")
    assert lines[0] == lines[1] and lines[0].startswith("jo") and lines[2:] == [""]
    greedy = lines[0]
    stop = greedy[3:5]
    assert len(stop) == 2
    code, out, _ = run_cli(["sample", trained_run, "--greedy", "-n", "1", "--prompt", "jo",
                            "--stop", stop], capsys)
    cont = greedy[2:]
    assert out == "jo" + cont[:cont.index(stop)] + "\n"
    # --max-new-tokens, and stream mode separates samples by a blank line
    code, out, _ = run_cli(["sample", stream_run, "--seed", "1", "-n", "3", "--prompt", "ab",
                            "--max-new-tokens", "5", "--temperature", "1"], capsys)
    assert code == 0
    st = load_checkpoint(stream_run)
    rng = random.Random(1)
    texts = [generate_text(st.params, st.config, st.tokenizer, "ab", docs_mode=False,
                           max_new_tokens=5, rng=rng, temperature=1.0) for _ in range(3)]
    assert out == "\n\n".join("ab" + t for t in texts) + "\n"


def test_cli_sample_errors_before_any_output(trained_run, capsys):
    code, out, err = run_cli(["sample", trained_run, "--prompt", "Ma!ry"], capsys)
    assert code != 0 and out == ""
    assert "'M'" in err and "'!'" in err and "not in the vocabulary" in err
    for bad in (["--temperature", "0"], ["--top-p", "0"], ["--top-k", "-2"]):
        code, out, err = run_cli(["sample", trained_run, "--prompt", "ma", *bad], capsys)
        assert code != 0 and out == "", bad
        assert "puregpt: error:" in err
    # greedy needs no temperature
    code, out, _ = run_cli(["sample", trained_run, "--greedy", "--temperature", "0", "-n", "1"],
                           capsys)
    assert code == 0 and out.strip()
    # a real process: exit status and an empty stdout
    r = subprocess.run([sys.executable, "-m", "puregpt", "sample", trained_run, "--prompt", "X"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == "" and "'X'" in r.stderr


# --- scoring -----------------------------------------------------------------------------------


def manual_score(params, cfg, ids):
    """Sum over targets t = 1..n-1 of log p(ids[t] | context) with the context of the windowed
    scheme: the first window (starts 0, stride, 2 stride, ...; stride = block_size // 2) whose
    block_size predictions include t, i.e. ids[s:t] with s the smallest start with s + B >= t."""
    B = cfg.block_size
    stride = max(1, B // 2)
    total = 0.0
    for t in range(1, len(ids)):
        s = 0 if t <= B else -(-(t - B) // stride) * stride
        assert 0 < t - s <= B and (t <= B or t - s > B - stride)
        z = model.forward(params, cfg, [ids[s:t]])[0][-1]
        total += log_softmax_at(z, ids[t])
    return total, len(ids) - 1


def test_score_ids_equals_a_manual_log_softmax_sum(trained):
    ck = trained
    tok = ck.tokenizer
    for text in ("anna", "x", "", "christopher", "abcdefghijklmnopqrstuvwxyz",
                 "mary" * 12):
        ids = tok.encode_doc(text)
        lp, n = score_ids(ck.params, ck.config, ids)
        want, n_want = manual_score(ck.params, ck.config, ids)
        assert n == n_want == len(text) + 1
        assert abs(lp - want) < 1e-9, (text, lp, want)
    # short documents: exactly one forward over all but the last token
    ids = tok.encode_doc("anna")
    logits = model.forward(ck.params, ck.config, [ids[:-1]])[0]
    direct = math.fsum(log_softmax_at(z, y) for z, y in zip(logits, ids[1:]))
    assert abs(score_ids(ck.params, ck.config, ids)[0] - direct) < 1e-9


def test_long_documents_are_scored_in_windows_each_target_once(monkeypatch):
    cfg, tok, params = tiny_model(list("abcdef"), seed=2)
    B = cfg.block_size
    seen = []
    real_forward = model.forward

    def recording_forward(p, c, inputs, **kw):
        seen.append([list(x) for x in inputs])
        return real_forward(p, c, inputs, **kw)

    rng = random.Random(9)
    for length in (B - 1, B, B + 1, B + 2, 2 * B, 3 * B + 1, 5 * B + 3):
        ids = [tok.bos] + [rng.randrange(6) for _ in range(length - 2)] + [tok.bos]
        seen.clear()
        monkeypatch.setattr(model, "forward", recording_forward)
        lp, n = score_ids(params, cfg, ids)
        monkeypatch.setattr(model, "forward", real_forward)
        assert n == len(ids) - 1
        assert all(len(x) <= B for x in seen[0])  # windows of at most block_size
        assert (len(seen[0]) == 1) == (len(ids) - 1 <= B)
        want, _ = manual_score(params, cfg, ids)
        assert abs(lp - want) < 1e-9, length


def parse_score_rows(out, n_texts):
    """(logprob, loss/token, tokens, text) of the table `puregpt score TEXT...` prints."""
    lines = out.splitlines()
    assert lines[0].split() == ["logprob", "loss/token", "tokens", "text"]
    rows = []
    for line in lines[1:1 + n_texts]:
        lp, loss, n, text = line.split(None, 3)
        rows.append((float(lp), float(loss), int(n), text))
    return rows


def test_cli_score_prints_the_manual_log_probability(trained_run, trained, capsys, monkeypatch):
    ck = trained
    texts = ["anna", "zq", "abcdefghijklmnopqrstuvwxyz"]  # the last is beyond block_size
    computed = []
    real = sample.score_ids

    def recording(*args, **kw):
        computed.append(real(*args, **kw))
        return computed[-1]

    monkeypatch.setattr(sample, "score_ids", recording)
    code, out, _ = run_cli(["score", "-m", trained_run, *texts], capsys)
    assert code == 0
    rows = parse_score_rows(out, len(texts))
    assert [r[3] for r in rows] == texts and len(out.splitlines()) == len(texts) + 1
    for (lp, loss, n, _), (c_lp, c_n), text in zip(rows, computed, texts):
        want, n_want = manual_score(ck.params, ck.config, ck.tokenizer.encode_doc(text))
        assert c_n == n == n_want == len(text) + 1
        assert abs(c_lp - want) < 1e-9  # what the command computed
        assert abs(lp - want) <= 5e-5 + 1e-9  # what it printed (4 decimals)
        assert abs(loss - (-want / n)) <= 5e-5 + 1e-9  # loss/token = -logprob / n
    assert rows[0][1] < rows[1][1]  # per token, a name is likelier than "zq"


def test_cli_score_data_mean_loss_and_perplexity(trained_run, trained, tmp_path, capsys):
    ck = trained
    docs = ["anna", "michael", "zq", "abcdefghijklmnopqrstuvwxyz", "emma"]
    data = tmp_path / "names.txt"
    data.write_text("\n".join(docs[:2]) + "\n\n  " + "\n".join(docs[2:]) + "\n")
    code, out, _ = run_cli(["score", "-m", trained_run, "--data", str(data), *docs], capsys)
    assert code == 0
    rows = parse_score_rows(out, len(docs))
    summary = out.splitlines()[-1]
    # "<file>: N tokens | mean loss X nats/token | perplexity Y"
    count = int(summary.split(": ")[1].split(" tokens")[0].replace(",", ""))
    loss = float(summary.split("mean loss ")[1].split()[0])
    ppl = float(summary.split("perplexity ")[1])
    manual = [manual_score(ck.params, ck.config, ck.tokenizer.encode_doc(d)) for d in docs]
    total = math.fsum(lp for lp, _ in manual)
    n_total = sum(n for _, n in manual)
    assert count == n_total == sum(r[2] for r in rows)
    assert abs(loss - (-total / n_total)) <= 5e-5 + 1e-9
    # token-weighted mean of the per-document losses printed above (each rounded to 1e-4)
    weighted = sum(r[1] * r[2] for r in rows) / n_total
    assert abs(loss - weighted) <= 1e-4
    assert abs(ppl - math.exp(-total / n_total)) <= 5e-4 + 1e-9
    assert abs(ppl - math.exp(loss)) <= 5e-4 + math.exp(loss) * 6e-5


def test_cli_score_stream_data_uses_consecutive_windows(stream_run, tmp_path, capsys):
    st = load_checkpoint(stream_run)
    cfg, tok, B = st.config, st.tokenizer, st.config.block_size
    text = "abc de\naab cdd ea\n\nbe ad cab e\n" * 3
    data = tmp_path / "stream.txt"
    data.write_text(text)
    code, out, _ = run_cli(["score", "-m", stream_run, "--data", str(data)], capsys)
    assert code == 0
    ids = tok.encode(text)
    total, n = 0.0, 0
    for s in range(0, len(ids) - 1, B):  # each window restarts the context
        for t in range(s + 1, min(s + B, len(ids) - 1) + 1):
            z = model.forward(st.params, cfg, [ids[s:t]])[0][-1]
            total += log_softmax_at(z, ids[t])
            n += 1
    assert n == len(ids) - 1
    assert f": {n:,} tokens |" in out
    loss = float(out.split("mean loss ")[1].split()[0])
    assert abs(loss - (-total / n)) <= 5e-5 + 1e-9


def test_cli_score_errors(trained_run, stream_run, tmp_path, capsys):
    code, out, err = run_cli(["score", "-m", trained_run], capsys)
    assert code == 2 and out == "" and "give documents to score" in err
    code, out, err = run_cli(["score", "-m", stream_run, "a"], capsys)  # one token: no target
    assert code == 2 and out == "" and "too short" in err and "'a'" in err
    # unknown characters are named; nothing is printed, not even the rows before the bad text
    code, out, err = run_cli(["score", "-m", trained_run, "anna", "Zoë!"], capsys)
    assert code != 0 and out == ""
    assert "'Z'" in err and "'ë'" in err and "'!'" in err and "not in the vocabulary" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, out, err = run_cli(["score", "-m", trained_run, "--data", str(empty)], capsys)
    assert code != 0 and "nothing to score" in err
    code, out, err = run_cli(["score", "-m", str(tmp_path / "missing"), "anna"], capsys)
    assert code != 0 and out == "" and "missing" in err
